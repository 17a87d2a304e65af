#!/bin/bash
# A sample job that starts children of its own and waits: stopping the job
# must stop all of them (they share its process group).
for i in 1 2 3; do
    sleep 300 &
done
echo "started children: $(jobs -p | tr '\n' ' ')"
wait
