#!/usr/bin/env python3
"""A FUSE file system that forgets, at a power cut, everything that was not made durable.

The model (POSIX's promise, read strictly; stricter than ext4 or XFS, never more lenient):
  - a file's contents and size become durable only at fsync/fdatasync of that file; what it held at
    its last fsync is what survives (a file never fsynced survives empty, if its name survives);
  - a name in a directory (create, mkdir, link, rename's new name, unlink's and rename's removal)
    becomes durable only at fsync of that directory; a directory's durable names are the ones it had at
    its last fsync;
  - after a cut, the tree is what is reachable from the root through durable names, each file with its
    durable contents. A file reachable under two durable names is one file (a hard link).

Everything lives in memory. `cut` (over the control socket) takes the one lock every operation holds and
never gives it back, so nothing more happens; it writes the durable state to the image file and answers
`ok`. The caller then kills the programs using the mount and this process, lazily unmounts, and mounts a
new instance from the image: the power came back. Requests that were in flight at the cut are lost with
the process, as a real disk loses what was in its queue.

    forgetful_fs.py MOUNTPOINT --control SOCKET [--image FILE]

The control socket also answers `stats` (fsync and directory-fsync counts since the first mount, as
JSON), and injects faults: `fail OP[,OP...] ERRNO` makes those operations (FUSE's names: write, fsync,
create, link, unlink, read, ...) fail with that errno (a name such as EIO) until `heal`. Unlike strace's
injection, which hits every write() of the process (tokio's eventfd wake-ups too), this hits only files. Needs fusepy and libfuse2 (Debian: libfuse2), and root (or fuse access) to mount.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import socket
import stat
import sys
import threading
import time

from fuse import FUSE, FuseOSError, Operations


class Node:
    def __init__(self, ino: int, mode: int, uid: int, gid: int) -> None:
        self.ino, self.mode, self.uid, self.gid = ino, mode, uid, gid
        self.nlink = 0
        self.mtime = self.ctime = self.atime = time.time()


class File(Node):
    def __init__(self, ino: int, mode: int, uid: int, gid: int) -> None:
        super().__init__(ino, mode, uid, gid)
        self.data = bytearray()
        self.durable = b""  # the contents at the last fsync


class Dir(Node):
    def __init__(self, ino: int, mode: int, uid: int, gid: int) -> None:
        super().__init__(ino, mode, uid, gid)
        self.entries: dict[str, Node] = {}
        self.durable: dict[str, Node] = {}  # the names at the last fsync


def durable_copy(root: Dir) -> Dir:
    """The tree a power cut leaves: durable names only, each file with its durable contents."""
    memo: dict[int, Node] = {}
    links: dict[int, int] = {}

    def copy(node: Node) -> Node:
        links[id(node)] = links.get(id(node), 0) + 1
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, Dir):
            new = Dir(node.ino, node.mode, node.uid, node.gid)
            memo[id(node)] = new
            new.entries = {name: copy(child) for name, child in node.durable.items()}
            new.durable = dict(new.entries)
        else:
            new = File(node.ino, node.mode, node.uid, node.gid)
            memo[id(node)] = new
            new.data = bytearray(node.durable)
            new.durable = node.durable
        new.mtime, new.ctime, new.atime = node.mtime, node.ctime, node.atime
        return new

    copied = copy(root)
    for old_id, node in memo.items():
        node.nlink = links[old_id]
    return copied


class ForgetfulFS(Operations):
    def __init__(self, root: Dir | None, stats: dict, control: str) -> None:
        self._mutex = threading.Lock()
        self.control = control
        self.stats = stats
        if root is None:
            root = Dir(1, stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
            root.nlink = 1
        self.root = root
        self.next_ino = 1 + max(self._inodes(root))
        self.handles: dict[int, Node] = {}
        self.next_fh = 1
        self.failing: dict[str, int] = {}  # operation -> errno, set over the control socket

    @staticmethod
    def _inodes(node: Node):
        yield node.ino
        if isinstance(node, Dir):
            for child in node.entries.values():
                yield from ForgetfulFS._inodes(child)

    # ------------------------------------------------------------------ the lock and the power cut

    def __call__(self, op, *args):
        with self._mutex:
            if op in self.failing:
                self.stats[f"failed_{op}"] = self.stats.get(f"failed_{op}", 0) + 1
                raise FuseOSError(self.failing[op])
            return super().__call__(op, *args)

    def init(self, path):
        threading.Thread(target=self._serve_control, daemon=True).start()

    def _serve_control(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.control)
        except FileNotFoundError:
            pass
        server.bind(self.control)
        server.listen(4)
        while True:
            conn, _ = server.accept()
            with conn:
                command = conn.makefile("r").readline().split()
                if command[:1] == ["cut"] and len(command) == 2:
                    self._mutex.acquire()  # never released: nothing happens after the cut
                    image = command[1]
                    with open(image + ".tmp", "wb") as f:
                        pickle.dump((durable_copy(self.root), self.stats), f, protocol=pickle.HIGHEST_PROTOCOL)
                    os.rename(image + ".tmp", image)
                    conn.sendall(b"ok\n")
                elif command[:1] == ["fail"] and len(command) == 3 and hasattr(errno, command[2]):
                    with self._mutex:
                        self.failing = {op: getattr(errno, command[2]) for op in command[1].split(",")}
                    conn.sendall(b"ok\n")
                elif command == ["heal"]:
                    with self._mutex:
                        self.failing = {}
                    conn.sendall(b"ok\n")
                elif command == ["stats"]:
                    with self._mutex:
                        conn.sendall(json.dumps(self.stats).encode() + b"\n")
                else:
                    conn.sendall(b"error: unknown command\n")

    # ------------------------------------------------------------------ paths and nodes

    def _split(self, path: str) -> tuple[Dir, str]:
        parent, _, name = path.rstrip("/").rpartition("/")
        node = self._lookup(parent or "/")
        if not isinstance(node, Dir):
            raise FuseOSError(errno.ENOTDIR)
        return node, name

    def _lookup(self, path: str) -> Node:
        node: Node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if not isinstance(node, Dir):
                raise FuseOSError(errno.ENOTDIR)
            node = node.entries.get(part)
            if node is None:
                raise FuseOSError(errno.ENOENT)
        return node

    def _new(self, cls, mode: int):
        ctx = fuse_context()
        node = cls(self.next_ino, mode, ctx[0], ctx[1])
        self.next_ino += 1
        return node

    def _handle(self, node: Node) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = node
        return fh

    def _file(self, path: str | None, fh: int | None) -> File:
        node = self.handles.get(fh) if fh else None
        if node is None:
            if path is None:
                raise FuseOSError(errno.EBADF)
            node = self._lookup(path)
        if isinstance(node, Dir):
            raise FuseOSError(errno.EISDIR)
        return node

    @staticmethod
    def _remove_name(parent: Dir, name: str) -> Node:
        node = parent.entries.pop(name)
        node.nlink -= 1
        parent.mtime = parent.ctime = node.ctime = time.time()
        return node

    # ------------------------------------------------------------------ metadata

    def getattr(self, path, fh=None):
        node = self.handles.get(fh) if fh else None
        if node is None:
            node = self._lookup(path)
        size = len(node.data) if isinstance(node, File) else 4096
        return {
            "st_ino": node.ino, "st_mode": node.mode, "st_nlink": max(node.nlink, 1),
            "st_uid": node.uid, "st_gid": node.gid, "st_size": size, "st_blocks": (size + 511) // 512,
            "st_atime": node.atime, "st_mtime": node.mtime, "st_ctime": node.ctime,
        }

    def access(self, path, amode):
        self._lookup(path)
        return 0

    def chmod(self, path, mode):
        node = self._lookup(path)
        node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
        node.ctime = time.time()
        return 0

    def chown(self, path, uid, gid):
        node = self._lookup(path)
        if uid != -1:
            node.uid = uid
        if gid != -1:
            node.gid = gid
        return 0

    def utimens(self, path, times=None):
        node = self._lookup(path)
        now = time.time()
        node.atime, node.mtime = times if times else (now, now)
        return 0

    def statfs(self, path):
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 24, "f_bfree": 1 << 23,
                "f_bavail": 1 << 23, "f_files": 1 << 20, "f_ffree": 1 << 19, "f_favail": 1 << 19,
                "f_namemax": 255}

    # ------------------------------------------------------------------ names (durable at the directory's fsync)

    def mkdir(self, path, mode):
        parent, name = self._split(path)
        if name in parent.entries:
            raise FuseOSError(errno.EEXIST)
        node = self._new(Dir, stat.S_IFDIR | (mode & 0o7777))
        node.nlink = 1
        parent.entries[name] = node
        parent.mtime = time.time()
        return 0

    def rmdir(self, path):
        parent, name = self._split(path)
        node = parent.entries.get(name)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        if not isinstance(node, Dir):
            raise FuseOSError(errno.ENOTDIR)
        if node.entries:
            raise FuseOSError(errno.ENOTEMPTY)
        self._remove_name(parent, name)
        return 0

    def create(self, path, mode, fi=None):
        parent, name = self._split(path)
        node = parent.entries.get(name)
        if node is None:
            node = self._new(File, stat.S_IFREG | (mode & 0o7777))
            node.nlink = 1
            parent.entries[name] = node
            parent.mtime = time.time()
        elif isinstance(node, Dir):
            raise FuseOSError(errno.EISDIR)
        return self._handle(node)

    def mknod(self, path, mode, dev):
        if not stat.S_ISREG(mode):
            raise FuseOSError(errno.EPERM)
        self.release(path, self.create(path, mode))
        return 0

    def unlink(self, path):
        parent, name = self._split(path)
        node = parent.entries.get(name)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        if isinstance(node, Dir):
            raise FuseOSError(errno.EISDIR)
        self._remove_name(parent, name)
        return 0

    def link(self, target, source):
        node = self._lookup(source)
        if isinstance(node, Dir):
            raise FuseOSError(errno.EPERM)
        parent, name = self._split(target)
        if name in parent.entries:
            raise FuseOSError(errno.EEXIST)
        parent.entries[name] = node
        node.nlink += 1
        parent.mtime = node.ctime = time.time()
        return 0

    def rename(self, old, new):
        old_parent, old_name = self._split(old)
        new_parent, new_name = self._split(new)
        node = old_parent.entries.get(old_name)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        replaced = new_parent.entries.get(new_name)
        if replaced is node:
            return 0
        if replaced is not None:
            if isinstance(replaced, Dir) != isinstance(node, Dir):
                raise FuseOSError(errno.EISDIR if isinstance(replaced, Dir) else errno.ENOTDIR)
            if isinstance(replaced, Dir) and replaced.entries:
                raise FuseOSError(errno.ENOTEMPTY)
            self._remove_name(new_parent, new_name)
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = node
        old_parent.mtime = new_parent.mtime = node.ctime = time.time()
        return 0

    def opendir(self, path):
        node = self._lookup(path)
        if not isinstance(node, Dir):
            raise FuseOSError(errno.ENOTDIR)
        return self._handle(node)

    def readdir(self, path, fh):
        node = self.handles.get(fh) or self._lookup(path)
        return [".", ".."] + list(node.entries)

    def releasedir(self, path, fh):
        self.handles.pop(fh, None)
        return 0

    def fsyncdir(self, path, datasync, fh):
        node = self.handles.get(fh) or self._lookup(path)
        node.durable = dict(node.entries)
        self.stats["fsyncdir"] = self.stats.get("fsyncdir", 0) + 1
        return 0

    # ------------------------------------------------------------------ contents (durable at the file's fsync)

    def open(self, path, flags):
        return self._handle(self._file(path, None))

    def read(self, path, size, offset, fh):
        node = self._file(path, fh)
        return bytes(node.data[offset:offset + size])

    def write(self, path, data, offset, fh):
        node = self._file(path, fh)
        if offset > len(node.data):
            node.data.extend(b"\0" * (offset - len(node.data)))
        node.data[offset:offset + len(data)] = data
        node.mtime = node.ctime = time.time()
        return len(data)

    def truncate(self, path, length, fh=None):
        node = self._file(path, fh)
        if length < len(node.data):
            del node.data[length:]
        else:
            node.data.extend(b"\0" * (length - len(node.data)))
        node.mtime = node.ctime = time.time()
        return 0

    def fsync(self, path, datasync, fh):
        node = self._file(path, fh)
        node.durable = bytes(node.data)
        self.stats["fsync"] = self.stats.get("fsync", 0) + 1
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        self.handles.pop(fh, None)
        return 0


def fuse_context() -> tuple[int, int, int]:
    from fuse import fuse_get_context
    return fuse_get_context()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mountpoint")
    ap.add_argument("--control", required=True, help="the Unix socket that takes `cut IMAGE` and `stats`")
    ap.add_argument("--image", help="start from the durable state a cut wrote (default: empty)")
    args = ap.parse_args()
    root, stats = None, {}
    if args.image:
        with open(args.image, "rb") as f:
            root, stats = pickle.load(f)
    fs = ForgetfulFS(root, stats, args.control)
    # hard_remove: an unlinked open file keeps its handle (no .fuse_hidden renames, which would be names
    # the program never made); big_writes: 128 KiB writes, not 4 KiB; use_ino: our inode numbers.
    FUSE(fs, args.mountpoint, foreground=True, nothreads=False, hard_remove=True, big_writes=True,
         use_ino=True, max_write=131072, fsname="forgetful")
    return 0


if __name__ == "__main__":
    sys.exit(main())
