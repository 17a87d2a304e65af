"""A sample Python job: prints its arguments and environment size."""

import os
import sys

print(f"python job {os.environ.get('AGENT_JOB_ID', '?')}: args={sys.argv[1:]}")
print(f"environment has {len(os.environ)} variables: {sorted(os.environ)}")
