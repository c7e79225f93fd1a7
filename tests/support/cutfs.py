#!/usr/bin/python3
"""cutfs: a FUSE passthrough that can cut the power (tests/powercut.rs).

Every call goes through to a backing "live" folder, so the program under test
runs as on a normal disk. Beside it cutfs keeps what a disk would still hold
after a power cut, under the persistence rules of POSIX that every file system
honours at least (ALICE's and LazyFS's model):

- a file's data is durable as of its last fsync or fdatasync; data written
  since is lost at the cut (the "torn" state keeps a random subset of the
  unsynced 4 KiB blocks, and may keep a grown size with zeros where the data
  did not make it);
- a create, mkdir, rename, unlink or rmdir is durable once its folder was
  fsynced (SQLite's syncDir does that for its WAL); before that it may be
  undone (the "strict" state undoes them all; the "meta" state keeps them
  all, without any unsynced data: metadata on the disk before the data; the
  "torn" state keeps a random prefix of them, in order);
- SQLite's database, -wal and -shm are files like any other;
- a file's permission bits (the executable bit of a swapped-in program)
  survive as they were last set: chmod is not modelled.

Durability-relevant calls (create, mkdir, rename, unlink, rmdir, truncate,
fsync, fsyncdir) are counted. At call number --cut-at, before it runs, the
power is cut: the calling process is SIGKILLed, the three crash states are
written to OUT/strict, OUT/meta and OUT/torn, OUT/cut.json says where, and every later
call fails with EIO. A cut can also be asked for while nothing happens: write
a pid into the --request file and cutfs kills that process and cuts. Each
counted call is listed in OUT/ops.txt ("N kind path").

Usage: cutfs.py LIVE MOUNT SHADOW OUT --cut-at N --seed S --request FILE
(run as root; foreground; SIGTERM unmounts).
"""

import argparse
import errno
import json
import os
import random
import shutil
import signal
import threading
import time

from fusepy import FUSE, FuseOSError, Operations, fuse_get_context

BLOCK = 4096


def split(rel):
    """'a/b/c' -> ('a/b', 'c'); 'c' -> ('', 'c')."""
    parent, _, name = rel.rpartition("/")
    return parent, name


class CutFs(Operations):
    use_ns = True

    def __init__(self, live, shadow, out, cut_at, seed, request):
        self.live = os.path.realpath(live)
        self.shadow = shadow
        self.out = out
        self.cut_at = cut_at
        self.seed = seed
        self.request = request
        self.mutex = threading.RLock()
        self.count = 0
        self.frozen = False
        self.next_fid = 0
        # Live namespace: relative file path -> file id (stable across renames).
        self.path_fid = {}
        # Durable namespace: relative folder path -> {name: ("f", fid) | ("d", None)}.
        self.durable = {}
        # Namespace calls not yet made durable by an fsync of their folder, in order.
        self.pending = []
        # File id -> {"blocks": set of 4 KiB block numbers written, "size": bool}
        # since its last sync.
        self.dirty = {}
        # Open file handle -> file id.
        self.fd_fid = {}
        # File id -> permission bits, kept in every crash state (a chmod is
        # taken as durable at once: it is not modelled).
        self.modes = {}
        self.ops = open(os.path.join(out, "ops.txt"), "a", buffering=1)
        for root, dirs, files in os.walk(self.live):
            rel = os.path.relpath(root, self.live)
            rel = "" if rel == "." else rel
            entries = {d: ("d", None) for d in dirs}
            for f in files:
                fid = self.new_fid()
                path = self.join(rel, f)
                self.path_fid[path] = fid
                shutil.copyfile(os.path.join(root, f), self.store(fid))
                self.modes[fid] = os.stat(os.path.join(root, f)).st_mode & 0o7777
                entries[f] = ("f", fid)
            self.durable[rel] = entries

    # -- bookkeeping -------------------------------------------------------

    @staticmethod
    def join(parent, name):
        return f"{parent}/{name}" if parent else name

    def new_fid(self):
        self.next_fid += 1
        return self.next_fid

    def store(self, fid):
        return os.path.join(self.shadow, str(fid))

    def rel(self, path):
        return path.lstrip("/")

    def real(self, path):
        return os.path.join(self.live, self.rel(path))

    def check(self):
        if self.frozen:
            raise FuseOSError(errno.EIO)

    def tick(self, kind, path):
        """Counts a durability-relevant call; cuts the power at --cut-at."""
        self.check()
        self.count += 1
        self.ops.write(f"{self.count} {kind} {path}\n")
        if self.count == self.cut_at:
            self.cut(f"op {self.count}: {kind} {path}", fuse_get_context()[2])
            raise FuseOSError(errno.EIO)

    def mark(self, fid, first, end, size=False):
        d = self.dirty.setdefault(fid, {"blocks": set(), "size": False})
        if end > first:
            d["blocks"].update(range(first // BLOCK, (end - 1) // BLOCK + 1))
        d["size"] = d["size"] or size

    def live_bytes(self, fid):
        for path, f in self.path_fid.items():
            if f == fid:
                with open(os.path.join(self.live, path), "rb") as fh:
                    return fh.read()
        for fd, f in self.fd_fid.items():
            if f == fid:
                return os.pread(fd, os.fstat(fd).st_size, 0)
        return None

    def durable_bytes(self, fid):
        try:
            with open(self.store(fid), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return b""

    # -- the cut -----------------------------------------------------------

    def cut(self, where, pid):
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.frozen = True
        rng = random.Random(f"{self.seed}/{self.count}")
        for variant in ("strict", "meta", "torn"):
            self.materialize(variant, os.path.join(self.out, variant), rng)
        with open(os.path.join(self.out, "cut.json.tmp"), "w") as fh:
            json.dump({"op": self.count, "where": where, "pending": len(self.pending)}, fh)
        os.replace(os.path.join(self.out, "cut.json.tmp"), os.path.join(self.out, "cut.json"))

    def materialize(self, variant, dest, rng):
        ns = {d: dict(e) for d, e in self.durable.items()}
        kept = 0
        if variant == "meta":
            kept = len(self.pending)
        elif variant == "torn" and self.pending:
            kept = len(self.pending) if rng.random() < 0.5 else rng.randint(0, len(self.pending))
        for op in self.pending[:kept]:
            self.apply(ns, op)

        def emit(rel):
            os.makedirs(os.path.join(dest, rel), exist_ok=True)
            for name, (kind, fid) in ns.get(rel, {}).items():
                path = self.join(rel, name)
                if kind == "d":
                    emit(path)
                else:
                    with open(os.path.join(dest, path), "wb") as fh:
                        fh.write(self.content(fid, variant, rng))
                    os.chmod(os.path.join(dest, path), self.modes.get(fid, 0o644))

        emit("")

    def content(self, fid, variant, rng):
        data = bytearray(self.durable_bytes(fid))
        d = self.dirty.get(fid)
        if variant != "torn" or not d:
            return bytes(data)
        live = self.live_bytes(fid)
        if live is None:
            return bytes(data)
        if d["size"] and rng.random() < 0.5:
            del data[len(live):]
        for b in sorted(d["blocks"]):
            if rng.random() < 0.5:
                seg = live[b * BLOCK:(b + 1) * BLOCK]
                if not seg:
                    continue
                if len(data) < b * BLOCK:
                    data.extend(bytes(b * BLOCK - len(data)))
                data[b * BLOCK:b * BLOCK + len(seg)] = seg
        # The size may reach the disk before the data (zeros where it did not).
        if len(live) > len(data) and rng.random() < 0.25:
            data.extend(bytes(len(live) - len(data)))
        return bytes(data)

    @staticmethod
    def apply(ns, op):
        kind = op[0]
        if kind == "mkdir":
            _, parent, name = op
            ns.setdefault(parent, {})[name] = ("d", None)
        elif kind == "create":
            _, parent, name, fid = op
            ns.setdefault(parent, {})[name] = ("f", fid)
        elif kind == "rename":
            _, sp, sn, dp, dn, entry = op
            if ns.get(sp, {}).get(sn) == entry:
                del ns[sp][sn]
            ns.setdefault(dp, {})[dn] = entry
        elif kind in ("unlink", "rmdir"):
            _, parent, name = op
            ns.get(parent, {}).pop(name, None)

    def watch_requests(self):
        """An idle cut: a pid in the request file."""
        while True:
            time.sleep(0.01)
            try:
                with open(self.request) as fh:
                    text = fh.read().strip()
            except FileNotFoundError:
                continue
            if not text:
                continue
            with self.mutex:
                if not self.frozen:
                    self.cut(f"idle after op {self.count}", int(text))
            return

    # -- FUSE calls ----------------------------------------------------------

    def init(self, path):
        with open(os.path.join(self.out, "ready"), "w") as fh:
            fh.write("mounted\n")

    def __call__(self, op, *args):
        with self.mutex:
            return super().__call__(op, *args)

    def getattr(self, path, fh=None):
        self.check()
        try:
            st = os.fstat(fh) if fh is not None else os.lstat(self.real(path))
        except OSError as e:
            raise FuseOSError(e.errno)
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")
        attrs = {k: getattr(st, k) for k in keys}
        for k in ("st_atime", "st_mtime", "st_ctime"):
            attrs[k] = getattr(st, k + "_ns")
        return attrs

    def access(self, path, amode):
        self.check()
        if not os.access(self.real(path), amode):
            raise FuseOSError(errno.EACCES)

    def readdir(self, path, fh):
        self.check()
        return [".", ".."] + os.listdir(self.real(path))

    def statfs(self, path):
        st = os.statvfs(self.real(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(st, k) for k in keys}

    def chmod(self, path, mode):
        self.check()
        os.chmod(self.real(path), mode)
        fid = self.path_fid.get(self.rel(path))
        if fid is not None:
            self.modes[fid] = mode & 0o7777

    def chown(self, path, uid, gid):
        self.check()
        os.chown(self.real(path), uid, gid)

    def utimens(self, path, times=None):
        self.check()
        os.utime(self.real(path), ns=times)

    def mkdir(self, path, mode):
        self.tick("mkdir", path)
        os.mkdir(self.real(path), mode)
        rel = self.rel(path)
        self.durable.setdefault(rel, {})
        self.pending.append(("mkdir",) + split(rel))

    def rmdir(self, path):
        self.tick("rmdir", path)
        os.rmdir(self.real(path))
        self.pending.append(("rmdir",) + split(self.rel(path)))

    def create(self, path, mode, fi=None):
        self.tick("create", path)
        fd = os.open(self.real(path), os.O_RDWR | os.O_CREAT, mode)
        rel = self.rel(path)
        if rel not in self.path_fid:
            fid = self.new_fid()
            self.path_fid[rel] = fid
            self.pending.append(("create",) + split(rel) + (fid,))
            self.modes[fid] = os.fstat(fd).st_mode & 0o7777
        self.fd_fid[fd] = self.path_fid[rel]
        return fd

    def open(self, path, flags):
        self.check()
        # Handles are also read to take a snapshot at fsync: never write-only.
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        fd = os.open(self.real(path), flags & ~os.O_CREAT)
        fid = self.path_fid[self.rel(path)]
        self.fd_fid[fd] = fid
        if flags & os.O_TRUNC:
            self.mark(fid, 0, 0, size=True)
        return fd

    def read(self, path, size, offset, fh):
        self.check()
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        self.check()
        n = os.pwrite(fh, data, offset)
        self.mark(self.fd_fid[fh], offset, offset + n)
        return n

    def truncate(self, path, length, fh=None):
        self.tick("truncate", path)
        if fh is not None:
            os.ftruncate(fh, length)
            fid = self.fd_fid[fh]
        else:
            os.truncate(self.real(path), length)
            fid = self.path_fid[self.rel(path)]
        self.mark(fid, 0, 0, size=True)

    def flush(self, path, fh):
        self.check()

    def release(self, path, fh):
        os.close(fh)
        self.fd_fid.pop(fh, None)

    def fsync(self, path, datasync, fh):
        self.tick("fdatasync" if datasync else "fsync", path)
        fid = self.fd_fid[fh]
        data = os.pread(fh, os.fstat(fh).st_size, 0)
        tmp = self.store(fid) + ".tmp"
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, self.store(fid))
        self.dirty.pop(fid, None)

    def fsyncdir(self, path, datasync, fh):
        self.tick("fsyncdir", path)
        rel = self.rel(path)
        entries = {}
        for name in os.listdir(self.real(path)):
            p = self.join(rel, name)
            entries[name] = ("f", self.path_fid[p]) if p in self.path_fid else ("d", None)
        self.durable[rel] = entries

        def only_here(op):
            if op[0] == "rename":
                return op[1] == rel and op[3] == rel
            return op[1] == rel

        self.pending = [op for op in self.pending if not only_here(op)]

    def rename(self, old, new):
        self.tick("rename", f"{old} -> {new}")
        os.rename(self.real(old), self.real(new))
        src, dst = self.rel(old), self.rel(new)
        if src in self.path_fid:
            entry = ("f", self.path_fid.pop(src))
            self.path_fid[dst] = entry[1]
        else:
            entry = ("d", None)
            for p in [p for p in self.path_fid if p.startswith(src + "/")]:
                self.path_fid[dst + p[len(src):]] = self.path_fid.pop(p)
        self.pending.append(("rename",) + split(src) + split(dst) + (entry,))

    def unlink(self, path):
        self.tick("unlink", path)
        os.unlink(self.real(path))
        rel = self.rel(path)
        self.path_fid.pop(rel, None)
        self.pending.append(("unlink",) + split(rel))

    def link(self, target, source):
        raise FuseOSError(errno.EPERM)

    def symlink(self, target, source):
        raise FuseOSError(errno.EPERM)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("live")
    p.add_argument("mount")
    p.add_argument("shadow")
    p.add_argument("out")
    p.add_argument("--cut-at", type=int, default=0)
    p.add_argument("--seed", default="0")
    p.add_argument("--request", required=True)
    a = p.parse_args()
    fs = CutFs(a.live, a.shadow, a.out, a.cut_at, a.seed, a.request)
    threading.Thread(target=fs.watch_requests, daemon=True).start()
    FUSE(fs, a.mount, foreground=True, nothreads=True, hard_remove=True,
         big_writes=True, max_write=131072, fsname="cutfs")


if __name__ == "__main__":
    main()
