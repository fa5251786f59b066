"""Builds the Valkey / Redis module (C) with the package: ``keymiss redis-module`` prints its path.

The module is a plain shared object a server loads (``--loadmodule``), not a Python extension: it
is named ``keymiss/valkey/module/keymiss.so`` and has no Python ABI tag.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = ["-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]


class BuildServerModule(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"

    def get_export_symbols(self, ext: Extension) -> list[str]:
        return []  # no PyInit_: Python never imports it


setup(
    ext_modules=[
        Extension(
            "keymiss.valkey.module.keymiss",
            sources=[
                "keymiss/valkey/module/load.c",
                "keymiss/valkey/module/serve.c",
                "keymiss/valkey/module/commands.c",
                "keymiss/valkey/module/events.c",
                "keymiss/valkey/module/entries.c",
                "keymiss/valkey/module/fresh.c",
                "keymiss/valkey/module/admission.c",
                "keymiss/valkey/module/errors.c",
                "keymiss/valkey/module/keyspace.c",
                "keymiss/valkey/module/slottag.c",
                "keymiss/valkey/module/glob.c",
                "keymiss/valkey/module/info.c",
                "keymiss/valkey/module/clients.c",
                "keymiss/valkey/module/tags.c",
                "keymiss/valkey/module/forget.c",
                "keymiss/valkey/module/util.c",
                "keymiss/valkey/module/api.c",
            ],
            depends=[
                "keymiss/valkey/module/keymiss.h",
                "keymiss/valkey/module/protocol.h",
                "keymiss/valkey/module/api.h",
            ],
            extra_compile_args=FLAGS,
            libraries=["m"],
        )
    ],
    cmdclass={"build_ext": BuildServerModule},
)
