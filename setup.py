"""The one compiled part: the job spawner's vfork path (agent/keeper/_vspawn.c).

Everything else is in pyproject.toml. ``optional=True``: a machine without a C compiler
or Python headers still installs; the spawner then uses its Python fork path
(agent.keeper.vspawn.choose).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "agent.keeper._vspawn",
            sources=["agent/keeper/_vspawn.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
