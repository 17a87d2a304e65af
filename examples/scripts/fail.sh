#!/bin/bash
# A sample job that fails with the exit status given (default 3).
echo "about to fail" >&2
exit "${1:-3}"
