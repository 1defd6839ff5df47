"""Files that readers on other ranks or processes poll: written whole under a temporary name, then renamed."""
import os
import threading


def write_text_atomic(path: str, text: str, sync: bool = False) -> None:
    """`path` holds either its old content or all of `text`, never a part: a reader polling for it (another rank,
    a resumed job) cannot see a half-written file. sync: fsync before the rename (what must survive a power loss)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
