"""Shared by the cffi build modules: a header becomes its own cdef."""


def cdef_from_header(path, keep_values=False):
    """The header minus preprocessor lines. ``#define GW_*`` constants stay: as
    ``...`` (cffi takes the value from the compiled header), or, with keep_values,
    with their literal value (needed where a cdef array size uses them)."""
    out = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#"):
            parts = s.split()
            if s.startswith("#define GW_") and not parts[1].endswith("_H"):
                if keep_values and len(parts) >= 3:
                    out.append(f"#define {parts[1]} {parts[2]}")
                elif not keep_values:
                    out.append(f"#define {parts[1]} ...")
            continue
        out.append(line)
    return "\n".join(out)


def libc_only_ffi(module, name, keep_values=False, libraries=()):
    """The FFI of a C module that needs nothing beyond libc (and ``libraries``):
    cffi_src/<name>.h is its cdef, cffi_src/<name>.c its one source, compiled as
    ``gpuwire.<module>`` with the project's flags."""
    import os
    import pathlib

    from cffi import FFI

    here = pathlib.Path(__file__).resolve().parent
    ffi = FFI()
    ffi.cdef(cdef_from_header(here / f"{name}.h", keep_values=keep_values))
    ffi.set_source(
        f"gpuwire.{module}",
        f'#include "{name}.h"',
        sources=[os.path.relpath(here / f"{name}.c")],
        include_dirs=[str(here)],
        libraries=list(libraries),
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    )
    return ffi
