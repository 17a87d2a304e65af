#!/bin/bash
# A sample job: counts to N (default 5), one line per second, then exits 0.
n=${1:-5}
for ((i = 1; i <= n; i++)); do
    echo "count $i of $n"
    sleep 1
done
echo "done" >&2
