"""The one compiled part: the job spawner's vfork path (agent/daemon/_vspawn.c).

Everything else is in pyproject.toml. ``optional=True``: a machine without a C compiler
or Python headers still installs; the spawner then uses its Python fork path
(agent.daemon.vspawn.choose).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "agent.daemon._vspawn",
            sources=["agent/daemon/_vspawn.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
