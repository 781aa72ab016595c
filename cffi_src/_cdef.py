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
