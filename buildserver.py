#!/usr/bin/env python3
"""buildserver: a self-hosted build server in one file.

Projects hold a shell command; builds run it on this host with a bounded pool
of workers. Every status change is a row, output is captured live into SQLite,
and the REST API is the build-jobs API of Polyaxon v0.x.

    python3 buildserver.py                  # serve on http://127.0.0.1:8000/
    python3 buildserver.py adduser alice    # prints alice's token
    python3 buildserver.py token alice      # a new token for alice

Endpoints (all under /api/v1, each with and without a trailing slash; the
dashboard is at /, and /api/v1/openapi.json describes them all):

    GET              /health
    GET              /users                           (who the token is)
    GET              /bookmarks/{user}/builds
    GET POST         /{user}
    GET PATCH DELETE /{user}/{project}
    GET POST         /{user}/{project}/builds
    POST             /{user}/{project}/builds/invalidate
    GET PATCH DELETE /{user}/{project}/builds/{id}    (POST there stops it)
    POST             /{user}/{project}/builds/{id}/stop
    POST             /{user}/{project}/builds/{id}/restart
    GET POST         /{user}/{project}/builds/{id}/statuses
    GET              /{user}/{project}/builds/{id}/statuses/{number or uuid}
    GET POST         /{user}/{project}/builds/{id}/logs
    GET POST         /{user}/{project}/builds/{id}/coderef
    POST             /{user}/{project}/builds/{id}/bookmark
    DELETE           /{user}/{project}/builds/{id}/unbookmark
    POST             /{user}/{project}/builds/{id}/invalidate
    POST             /{user}/{project}/builds/{id}/_heartbeat

The server needs bottle and waitress; everything else is the standard library.
"""

import argparse
import base64
import collections
import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid as uuidlib

try:
    import bottle
except ImportError:  # the client commands work with the standard library alone
    bottle = None

__version__ = "0.1.0"
log = logging.getLogger("buildserver")


###############################################################################
# Constants ###################################################################
###############################################################################

KiB, MiB = 1024, 1024 * 1024
SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql")
SCHEMA_VERSION = 10  # schema.sql's newest migration, the one this file is written for

# The status machine, the one source of truth for the runner and for statuses
# reported by whatever runs an unmanaged build.
TRANSITIONS = {
    "created": {"scheduled", "running", "stopped"},
    "scheduled": {"running", "stopped"},
    "running": {"succeeded", "failed", "stopping"},
    "stopping": {"stopped", "failed"},
    "succeeded": set(),
    "failed": set(),
    "stopped": set(),
}
STATUSES = tuple(TRANSITIONS)
FINAL = frozenset(s for s, nexts in TRANSITIONS.items() if not nexts)
ACTIVE = tuple(s for s in STATUSES if s not in FINAL)  # created, scheduled, running, stopping
WAITING = ("created", "scheduled")  # not started: a stop ends them at once
STARTED = ("running", "stopping")   # a command runs (managed builds: on this server)
DELETED_MEANWHILE = "It was deleted while this request ran."
# What the server tells each build's command about it (a build's env cannot set them).
BUILD_VARIABLES = ("BUILD_ID", "BUILD_UUID", "BUILD_PROJECT", "BUILD_USER", "BUILD_WORKSPACE")

JSON_BODY_LIMIT = 1 * MiB
PAGE_MAX = 1000              # the most items of a list's page (?limit=)
LONE_SURROGATE = ("The request body has a \\u escape that is not a character "
                  "(a lone surrogate such as \\ud800).")
LOG_BODY_LIMIT = 8 * MiB
LOG_CHUNK = 512 * KiB        # the largest row of log_chunks
LOG_JOIN = 16 * KiB          # a smaller last chunk is joined by the next write
LOG_JSON_DEFAULT = 1 * MiB   # bytes per JSON log page unless ?limit= says otherwise
LOG_JSON_MAX = 4 * MiB        # a page's text can take 6 bytes a byte as JSON (control bytes)
LOG_FLUSH_SECONDS = 0.2      # a follower sees output within this, a crash loses at most this
PIPE_SIZE = 1 * MiB          # asked of the kernel for each build's output pipe (Linux)
FOLLOW_WAIT_SECONDS = 1.0    # a follower re-checks its build this often (its client leaving wakes it)
HEAD_SECONDS = 30.0          # a request's head (line and headers) must arrive within this
                             # (the first one: from the connection's accept)
FOLLOW_BACKLOG = 1 * MiB     # a follower's output waiting for its client, at most
FOLLOW_STALL_SECONDS = 60.0  # a follower whose client takes nothing for this long ends
ANSWER_STALL_SECONDS = 60.0  # so does any answer (checked every 30 s: closed within 90)
SHUTDOWN_SECONDS = 10.0      # a shutdown waits this long for requests that wait on builds
FOLLOW_SHUTDOWN_SECONDS = 8.0  # of which followers have this long for the rest
SHUTDOWN_STALL_SECONDS = 3.0   # ... unless their client takes nothing for this long
SHUTDOWN_LINGER_SECONDS = 1.0  # then reads are answered this long, if there were followers
DRAIN_SECONDS = 1.0          # how long output may trickle in after a build's group is killed
STOP_ANSWER_SECONDS = 2.0    # a stop waits this long for the build to end before answering
ESCAPED_SEARCH_DELAY = 0.01  # a stopped shell's other process groups are sought after (s)
MEMBERS_SECONDS = 0.005      # a stopped shell's group is checked again after this, then less often
REAP_SECONDS = 1.0           # the orphans builds left that ended are reaped about this often
COALESCE_BYTES = 64 * KiB    # a body up to this goes out in one send with its head
REFUSED_DRAIN = 32 * MiB     # of a refused body, read and dropped at most (see _channel_class)

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# Routes that share the /api/v1/{username} level: never user names
RESERVED_USERNAMES = {"health", "users", "openapi.json", "bookmarks"}


###############################################################################
# Config ######################################################################
###############################################################################

DB_FILE = "buildserver.db"  # in the data folder, beside workspaces/
SERVE_LOCK = "serve.lock"    # there too: held by the server that uses the folder


@dataclasses.dataclass
class Config:
    """What `serve` is told; each field is a flag and a BUILDSERVER_* variable."""
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = "./buildserver-data"
    workers: int = 2
    threads: int = 32
    stop_grace: float = 10.0
    max_log_bytes: int = 100 * MiB
    auth_burst: int = 30     # failed authentications per address and minute before 429s
    trusted_proxy: str = ""  # the reverse proxy whose X-Forwarded-* headers are believed

    @property
    def db_path(self):
        return os.path.join(self.data_dir, DB_FILE)

    @property
    def workspaces(self):
        # Absolute: a build runs inside its workspace, where a relative
        # BUILD_WORKSPACE (from the default ./buildserver-data) would point nowhere.
        return os.path.join(os.path.abspath(self.data_dir), "workspaces")

    @property
    def max_waiting(self):
        """Requests that wait on builds (followers, stops and deletes of
        running builds) each hold an HTTP thread; keep a reserve for the API."""
        return max(1, self.threads - max(2, self.threads // 4))


def now_iso():
    # isoformat is twice as fast as strftime; "+00:00" becomes "Z"
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")[:-6] + "Z"


def parse_iso(text):
    # fromisoformat is ~30x faster than strptime; before 3.11 it refuses the "Z".
    return datetime.datetime.fromisoformat(text[:-1]).replace(tzinfo=datetime.timezone.utc)


class ApiError(Exception):
    """An answer other than 2xx: {"detail": ...} plus per-field "errors" on a 400."""

    def __init__(self, status, detail, errors=None, headers=None):
        super().__init__(detail)
        self.status, self.detail, self.errors, self.headers = status, detail, errors, headers or {}

    def body(self):
        body = {"detail": self.detail}
        if self.errors:
            body["errors"] = self.errors
        return body


###############################################################################
# Validation ##################################################################
###############################################################################
# Fields are described as JSON Schema fragments. One small checker enforces
# them, and each "description" is also the sentence an invalid value gets back.

FIELDS = {
    "project_name": {"type": "string", "pattern": NAME_RE,
                     "description": "1 to 64 letters, digits, '_' or '-', starting with a letter or digit"},
    "description": {"type": ["string", "null"], "maxLength": 4096,
                    "description": "a string of at most 4096 characters, or null"},
    "command": {"type": ["string", "null"], "minLength": 1, "maxLength": 64 * KiB,
                "x-maxBytes": 64 * KiB, "pattern": "^[^\\u0000]*$",
                "description": "a non-empty shell command of at most 65536 bytes (UTF-8), "
                               "without NUL bytes"},
    # exec takes a NAME=value of up to 128 KiB with its NUL: 256 + 1 + 130814 + 1.
    # The server sets BUILD_ID and its kin last: a build's own would never be seen.
    "env": {"type": ["object", "null"], "maxProperties": 100,
            "propertyNames": {"pattern": "^(?!(%s)$)[A-Za-z_][A-Za-z0-9_]*$"
                                         % "|".join(BUILD_VARIABLES), "maxLength": 256},
            "additionalProperties": {"type": "string", "pattern": "^[^\\u0000]*$",
                                     "x-maxBytes": 128 * KiB - 258},
            "description": "an object of at most 100 NAME: \"value\" strings, names like PATH "
                           "or MY_VAR of at most 256 characters, values under 128 KiB (UTF-8); "
                           "not " + ", ".join(BUILD_VARIABLES[:-1]) + " or "
                           + BUILD_VARIABLES[-1] + ", which the server sets"},
    "timeout": {"type": ["integer", "null"], "minimum": 1, "maximum": 604800,
                "description": "whole seconds from 1 to 604800, or null for no limit"},
    "name": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9_-]{1,128}$",
             "description": "1 to 128 letters, digits, '_' or '-', or null"},
    "tags": {"type": ["array", "null"], "maxItems": 20,
             "items": {"type": "string", "minLength": 1, "maxLength": 64},
             "description": "a list of at most 20 strings of 1 to 64 characters"},
    "is_managed": {"type": ["boolean", "null"], "description": "true or false (null: true)"},
    "status": {"type": "string", "enum": list(STATUSES),
               "description": "one of " + ", ".join(STATUSES)},
    "message": {"type": ["string", "null"], "maxLength": 4096,
                "description": "a string of at most 4096 characters, or null"},
    "traceback": {"type": ["string", "null"], "maxLength": 64 * KiB,
                  "description": "a string of at most 65536 characters, or null"},
    # Polyaxon's tracking client sends backend and dockerfile (how its image
    # is built), which mean nothing here: taken, and dropped (POLYAXON_DROPPED).
    "backend": {"type": ["string", "null"], "maxLength": 256,
                "description": "the name of a Polyaxon image builder (not kept), or null"},
    "dockerfile": {"type": ["string", "null"], "maxLength": 64 * KiB,
                   "description": "a Dockerfile of at most 65536 characters (not kept), or null"},
    "merge": {"type": ["boolean", "null"],
              "description": "true to add `tags` to the build's, false or null to replace them"},
}
POLYAXON_DROPPED = ("backend", "dockerfile")

PROJECT_CREATE = {"name": FIELDS["project_name"], **{
    f: FIELDS[f] for f in ("description", "command", "env", "timeout")}}
PROJECT_PATCH = {f: FIELDS[f] for f in ("description", "command", "env", "timeout")}
BUILD_CREATE = {f: FIELDS[f] for f in (
    "command", "env", "timeout", "name", "description", "tags", "is_managed", "backend")}
BUILD_PATCH = {f: FIELDS[f] for f in (
    "name", "description", "tags", "merge", "backend", "dockerfile")}
# Polyaxon's tracking client sends "" for what it could not find (a repository
# without a remote, say): "" is null here, as everywhere.
_COMMIT = {"type": ["string", "null"], "pattern": "^([0-9a-fA-F]{4,64})?$",
           "description": "a git commit id (4 to 64 hex digits), or null"}
# Polyaxon's client sends its reference's id too (null), and "HEAD" for the
# commits of a repository with none yet: null, as its "" is.
_COMMIT_OR_HEAD = {**_COMMIT, "pattern": "^([0-9a-fA-F]{4,64}|HEAD)?$",
                   "description": "a git commit id (4 to 64 hex digits), or null (\"HEAD\", "
                                  "a repository's with no commit yet, is null too)"}
CODE_REFERENCE = {
    "commit": _COMMIT, "head": _COMMIT,
    "branch": {"type": ["string", "null"], "maxLength": 255,
               "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$",  # (C0, DEL, C1)
               "description": "a branch name of at most 255 characters, without control "
                              "characters, or null"},
    "git_url": {"type": ["string", "null"], "maxLength": 2048,
                "pattern": "^[^\\s\\u0000-\\u0020\\u007f-\\u009f]*$",  # (and Unicode's spaces)
                "description": "the repository's URL of at most 2048 characters, without "
                               "spaces or control characters, or null"},
    "is_dirty": {"type": ["boolean", "null"],
                 "description": "true if the working tree had changes, false, or null"},
}
CODE_REFERENCE_BODY = {**CODE_REFERENCE, "commit": _COMMIT_OR_HEAD, "head": _COMMIT_OR_HEAD,
                       "id": {"type": "null", "description": "null (Polyaxon's client sends it)"}}
STATUS_REPORT = {f: FIELDS[f] for f in ("status", "message", "traceback")}

# polyaxon-client's create_build sends every field of its job schema, unset
# ones as null; those mean nothing here, so a null one is let through.
POLYAXON_NULLABLE = frozenset({
    "id", "uuid", "unique_name", "user", "project", "build_job", "last_status",
    "created_at", "updated_at", "started_at", "finished_at", "pod_id", "total_run",
    "content", "definition", "resources", "ttl", "is_clone", "dockerfile"})

def _is_text(value):
    """A str that is valid Unicode: JSON's "\\ud800" (a lone surrogate) is not."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_TYPES = {
    "string": _is_text,
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
               or (isinstance(v, float) and v.is_integer()),  # JSON Schema: 70.0 is one
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


@functools.lru_cache(maxsize=None)
def _pattern(pattern):
    # JSON Schema's "$" is the end of the text; Python's also allows a final "\n".
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


def conforms(value, schema):
    """Whether `value` satisfies the subset of JSON Schema that FIELDS uses."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if types and not any(_TYPES[t](value) for t in types):
        return False
    if value is None:
        return True
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, str):
        return (schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value))
                and ("x-maxBytes" not in schema  # exec's limits are in bytes
                     or len(value.encode("utf-8")) <= schema["x-maxBytes"])
                and ("pattern" not in schema or bool(_pattern(schema["pattern"]).search(value))))
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float)):
        return schema.get("minimum", value) <= value <= schema.get("maximum", value)
    if isinstance(value, list):
        return (len(value) <= schema.get("maxItems", len(value))
                and all(conforms(v, schema.get("items", {})) for v in value))
    if isinstance(value, dict):
        return (len(value) <= schema.get("maxProperties", len(value))
                and all(conforms(k, schema.get("propertyNames", {}))
                        and conforms(v, schema.get("additionalProperties", {}))
                        for k, v in value.items()))
    return True


def validate(data, fields, required=(), tolerated=frozenset()):
    """The fields of `data` that `fields` allows, or ApiError(400) naming each bad one.

    :param tolerated: names that are let through (and dropped) when null.
    """
    errors = {}
    for key, value in data.items():
        if key in fields:
            if not conforms(value, fields[key]):
                errors[key] = "must be " + fields[key]["description"]
        elif not (key in tolerated and value is None):
            errors[key] = "is not a field of this request"
    for key in required:
        if key not in data:
            errors[key] = "is required"
    if errors:  # (a careless script's 50 000 unknown fields are named in 10)
        shown = sorted(errors)[:10]
        more = f" and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise ApiError(400, f"The request has invalid fields: "
                            f"{', '.join(map(_clipped, shown))}{more}.",
                       errors={name: errors[name] for name in shown})
    # Unset values are null, never "": an empty string where null is allowed is
    # null. A whole number written 70.0 is stored as 70.
    return {k: None if v == "" and conforms(None, fields[k]) else
            int(v) if isinstance(v, float) else v
            for k, v in data.items() if k in fields}


def _clipped(name, most=64):
    return name if len(name) <= most else name[:most] + "..."


def without_dropped(fields):
    """Validated `fields` without those taken only for Polyaxon's client."""
    return {k: v for k, v in fields.items() if k not in POLYAXON_DROPPED}


def valid_name(name):
    return isinstance(name, str) and bool(_pattern(NAME_RE).search(name))


def whole_number(text, digits=18):
    """`text` as an int if it is 1 to `digits` ASCII digits, else None."""
    return int(text) if re.fullmatch(r"[0-9]{1,%d}" % digits, text or "") else None


def content_length(text):
    """A Content-Length's number, or None if it is none: one of 19 digits
    or more (not counting leading zeros) is over every limit, not "not a
    number", and never handed to int() (past 4300 digits it raises)."""
    if not re.fullmatch(r"[0-9]+", text or ""):
        return None
    return int(text) if len(text.lstrip("0")) <= 18 else 10 ** 18


###############################################################################
# Database ####################################################################
###############################################################################

def _sqlite_failed(error, codes, words):
    """Whether `error` is SQLite's, with one of the result `codes` (before
    Python 3.11, which does not tell the code: its message has one of `words`)."""
    if not isinstance(error, sqlite3.Error):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in codes
    return isinstance(error, sqlite3.OperationalError) and any(w in str(error) for w in words)


# SQLite's primary result codes (the sqlite3 module names them from Python 3.11 on).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = \
    5, 6, 8, 10, 13, 14


def unavailable(error):
    """Whether an error is SQLite's, from the machine (a full disk, an I/O
    error, a lock held past the busy timeout), not from a bug."""
    return _sqlite_failed(error, (SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR,
                                  SQLITE_FULL, SQLITE_CANTOPEN),
                          ("disk", "locked", "readonly", "unable to open"))


def _busy(error):
    """Whether SQLite refused a lock (another connection holds it)."""
    return _sqlite_failed(error, (SQLITE_BUSY, SQLITE_LOCKED), ("locked",))


class LogClosed(Exception):
    """The build is final: its log takes no more output."""


class SchemaError(Exception):
    """The database file is not one this version of buildserver can use."""


def _check_sqlite():
    """SchemaError unless Python's SQLite has what the queries use: pragma
    functions (3.16) and JSON1 (built in from 3.38; most builds had it before).
    Without, they fail later, in words that blame the disk or a table."""
    missing = "is older than 3.16" if sqlite3.sqlite_version_info < (3, 16) else None
    if missing is None:
        try:
            with contextlib.closing(sqlite3.connect(":memory:")) as probe:
                probe.execute("SELECT count(*) FROM json_each('[]')")
        except sqlite3.OperationalError:
            missing = "has no JSON1"
    if missing:
        raise SchemaError(f"the SQLite this Python uses ({sqlite3.sqlite_version}) {missing}: "
                          "buildserver needs SQLite 3.16 or newer with JSON1")


class UnsafeDataFolder(Exception):
    """Something in the data folder would aim the server out of it."""


def _file_uri(path, mode):
    """SQLite's URI for the file at `path`, whatever bytes its name holds
    (a name that is not UTF-8 too)."""
    return f"file:{urllib.parse.quote(os.fsencode(os.path.abspath(path)))}?mode={mode}"


class Database:
    """SQLite connections: a reader per thread, and one writer connection that
    threads take turns on.

    WAL lets readers run beside the writer. Writers in this process queue on a
    Python lock instead of SQLite's busy handler, which sleeps in steps of up
    to 100 ms; the busy timeout remains for other processes (the CLI). A commit
    empties the page cache of every other connection: with all writes on one
    connection, the writer's cache stays warm.
    """

    CHECKPOINT_BYTES = 8 * MiB   # written to the WAL before a checkpoint is due,
    CHECKPOINT_PAUSE = 0.1       # which waits for the writes to pause this long (s)
    # or for this much (past it, writers wait while the WAL empties): a build
    # writing the default --max-log-bytes at full speed never meets a checkpoint.
    WAL_LIMIT = 128 * MiB
    COMMIT_PAGES = 8             # pages a commit writes (rows and their index entries)
    RETRY_SECONDS = 5.0          # after a checkpoint failed, whether or not more is written
    RECENT_SECONDS = 1.0         # how long a remembered row may miss another process's write
    RECENT_ROWS = 64             # remembered at most, then all forgotten (few outlive a commit)
    RECENT_ROW_BYTES = 16 * KiB  # the largest remembered (a build's env may be megabytes)
    READ_CACHE_KIB = 512         # each reading connection's page cache (SQLite's: 2000)

    def __init__(self, path, background_checkpoints=False):
        """:param background_checkpoints: copy the WAL back into the database in
        a thread of its own, instead of in whichever commit crosses 1000 pages
        (a log flush, say, which would then wait for the fsyncs)."""
        self.path = path
        # mode=rw: once the file is gone (deleted while the server runs), a
        # new connection fails instead of making a new, empty database.
        self._uri = _file_uri(path, "rw")
        self._file = None  # the file's (device, inode) once migrated
        self._told_replaced = False
        self._local = threading.local()
        self._connections = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._writer = None
        self._background = background_checkpoints
        self._wal_bytes = 0  # since the last checkpoint
        self._last_write = 0.0
        self._page_size = 4 * KiB  # until migrate() reads the file's
        self._checkpoint_due = threading.Event()  # CHECKPOINT_BYTES written
        self._checkpoint_now = threading.Event()  # WAL_LIMIT written, or closing
        self._checkpointer = None
        self._closed = threading.Event()  # also ends the checkpointer's waits for a retry
        self._after_commit = []  # touched only under _write_lock
        # Commits made here, counted twice: odd during a COMMIT. A remembered
        # row is good until the count moves.
        self._commits = 0
        self._recent = {}  # (sql, params) -> (commits before the read, good until, row)

    def connect(self):
        conn = sqlite3.connect(self._uri, uri=True, timeout=30, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA foreign_keys = ON")
        # NORMAL in WAL mode never corrupts and loses nothing when the process
        # dies; only a power cut may take back the last transactions.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = %d" % (64 * MiB))
        # Debian's SQLite zeroes what a delete frees, through the WAL: deleting
        # old logs to make room took their size again, and failed on a full
        # disk. FAST zeroes only what it writes anyway (freed pages keep their
        # bytes until reused).
        conn.execute("PRAGMA secure_delete = FAST")
        if self._background:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    @property
    def conn(self):
        """This thread's connection for reading."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._kept(self.connect())
            # Each HTTP thread keeps one: with SQLite's 2 MB each, a server
            # after heavy use stayed at 175-215 MB; at 512 KiB, 113-115 MB,
            # and as fast (README, "Speed").
            conn.execute("PRAGMA cache_size = -%d" % self.READ_CACHE_KIB)
        return conn

    def _kept(self, conn):
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _reader(self):
        """Inside this thread's write transaction, the writer: a read sees the
        transaction, and nothing can be written between the two."""
        return self._writer if getattr(self._local, "writing", False) else self.conn

    def all(self, sql, params=()):
        return self._reader().execute(sql, params).fetchall()

    def one(self, sql, params=()):
        return self._reader().execute(sql, params).fetchone()

    def recent(self, sql, params=()):
        """one(sql, params), or the row it gave when nothing was committed here
        since, less than RECENT_SECONDS ago (for another process's writes: a
        token replaced with the CLI). For the rows that requests read over and
        over (a token, a build a script polls): under concurrent requests a
        SQLite read hands the GIL to another thread at each of its three calls,
        which costs more than the rest of such a request."""
        if getattr(self._local, "writing", False):  # it must see its own writes
            return self.one(sql, params)
        key, now = (sql, params), time.monotonic()
        commits = self._commits  # before the read: a commit during it outdates the row
        kept = self._recent.get(key)
        if kept is not None and kept[0] == commits and now < kept[1]:
            return kept[2]
        row = self.one(sql, params)
        if row is not None and not commits % 2 and row_bytes(row) <= self.RECENT_ROW_BYTES:
            if len(self._recent) >= self.RECENT_ROWS:
                self._recent.clear()
            self._recent[key] = (commits, now + self.RECENT_SECONDS, row)
        return row

    @contextlib.contextmanager
    def snapshot(self):
        """Reads that see one state of the database (a count and its page):
        one read transaction on this thread's connection."""
        conn = self._reader()
        if conn.in_transaction:  # inside a write, or a snapshot already
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("COMMIT")  # (it only read)

    @contextlib.contextmanager
    def write(self):
        """A write transaction; BEGIN IMMEDIATE takes the lock up front, so
        a transaction never fails half-way on a lock upgrade."""
        with self._write_lock:
            if self._writer is None:
                self._writer = self._kept(self.connect())
            conn = self._writer
            if conn.in_transaction:  # nested: part of the outer transaction
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            self._local.writing = True
            try:
                yield conn
                # Odd while COMMIT may be visible but not yet counted: a read
                # then would see the commit, and a remembered row would not.
                self._commits += 1
                conn.execute("COMMIT")
            except BaseException:
                self._after_commit.clear()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._local.writing = False
                self._commits += self._commits % 2  # before the callbacks wake followers
            self.wrote(self.COMMIT_PAGES * self._page_size)
            callbacks, self._after_commit = self._after_commit, []
            for callback in callbacks:
                callback()

    def after_commit(self, callback):
        """Call `callback` once the transaction being written has committed,
        still holding the write lock: callbacks run in commit order."""
        self._after_commit.append(callback)

    def wrote(self, size):
        """Count what went into the WAL (always under the write lock); past
        CHECKPOINT_BYTES wake the checkpointer."""
        self._wal_bytes += size
        self._last_write = time.monotonic()
        if self._background and self._wal_bytes >= self.CHECKPOINT_BYTES and \
                not self._closed.is_set():
            if self._checkpointer is None:
                self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                                      name="checkpointer", daemon=True)
                self._checkpointer.start()
            self._checkpoint_due.set()
            if self._wal_bytes >= self.WAL_LIMIT:
                self._checkpoint_now.set()

    def _checkpoint_loop(self):
        try:
            conn = self.connect()
        except sqlite3.Error as e:  # no file descriptors, say: a later commit starts another
            log.error("cannot start checkpoints (%s); trying again later", e)
            self._closed.wait(self.RETRY_SECONDS)
            self._checkpointer = None
            return
        try:
            while True:
                self._checkpoint_due.wait()
                self._wait_for_a_pause()
                with self._write_lock:  # where writers count and wake: nothing is lost
                    self._wal_bytes = 0
                    self._checkpoint_due.clear()
                    self._checkpoint_now.clear()
                if self._closed.is_set():
                    return
                try:
                    # PASSIVE runs beside the writers; but with writers never pausing
                    # the WAL is never reset, so past WAL_LIMIT they wait for a TRUNCATE.
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    if _file_size(self.path + "-wal") > self.WAL_LIMIT:
                        with self._write_lock:
                            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as e:  # a full disk, say: tried again, writes or not
                    log.error("checkpoint failed (%s); trying again in %d s", e,
                              self.RETRY_SECONDS)
                    self._closed.wait(self.RETRY_SECONDS)
                    self._checkpoint_due.set()
        finally:
            conn.close()

    def _wait_for_a_pause(self):
        """Until the writes pause, or WAL_LIMIT bytes have gone into the WAL: a
        build pouring out output does not share the cores and the disk with
        copies of what it just wrote."""
        while not self._closed.is_set() and self._wal_bytes < self.WAL_LIMIT:
            paused = time.monotonic() - self._last_write
            if paused >= self.CHECKPOINT_PAUSE:
                return
            self._checkpoint_now.wait(self.CHECKPOINT_PAUSE - paused)

    def migrate(self, schema_path=SCHEMA_PATH):
        """Bring the file up to the newest `-- migration N` of schema.sql."""
        _check_sqlite()
        migrations = read_migrations(schema_path)
        _create_private(self.path)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._migrate(migrations)
                self._file = _file_identity(self.path)
                return
            except sqlite3.OperationalError as e:
                # Processes opening a new file at once (adduser beside serve):
                # SQLite answers some lock waits of the switch to WAL with
                # "locked" at once, whatever the busy timeout. Every step is
                # checked again on the next try.
                if not _busy(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _migrate(self, migrations):
        try:  # only reads until the file is known to be ours; one read, one snapshot
            conn = self.conn
            version, tables = conn.execute(
                "SELECT user_version, (SELECT count(*) FROM sqlite_master WHERE type = 'table')"
                " FROM pragma_user_version").fetchone()
        except sqlite3.DatabaseError as e:
            if _busy(e):
                raise
            if "unable to open" in str(e):  # (SQLITE_CANTOPEN) a folder it may not write, say
                raise SchemaError(f"cannot open {self.path} ({e}): this user must be able to "
                                  "read and write it and its folder") from None
            if "not a database" in str(e) or "malformed" in str(e):
                raise SchemaError(f"{self.path} is not a SQLite database ({e})") from None
            # A full disk, say: opening writes the -shm and -wal files beside it.
            raise SchemaError(f"cannot open {self.path} ({e}); is its disk full, or "
                              "failing?") from None
        if version == 0 and tables:
            raise SchemaError(f"{self.path} holds tables that buildserver did not make; "
                              "refusing to touch it")
        if version > max(migrations):
            raise SchemaError(f"{self.path} was written by a newer buildserver "
                              f"(schema version {version}, this one knows {max(migrations)})")
        if version and conn.execute(  # another program's file that has a version of its own
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                " AND name IN ('users', 'projects', 'builds')").fetchone()[0] < 3:
            raise SchemaError(f"{self.path} is not a buildserver database (its schema version "
                              f"is {version}, but it lacks buildserver's tables); refusing to "
                              "touch it")
        if not tables:
            # Logs are most of the bytes: 16 KiB pages store them with a quarter
            # of the per-page work (settable only before the first table and WAL).
            conn.execute("PRAGMA page_size = 16384")
        conn.execute("PRAGMA journal_mode = WAL")
        self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        if version == 8 and not conn.execute(
                "SELECT count(*) FROM pragma_table_info('server_process')"
                " WHERE name = 'pid_namespace'").fetchone()[0]:
            with self.write() as c:  # migration 8 as 465c72c made it (see migration 9)
                c.execute("ALTER TABLE server_process ADD COLUMN pid_namespace TEXT")
        for number in sorted(n for n in migrations if n > version):
            with self.write() as c:
                if c.execute("PRAGMA user_version").fetchone()[0] >= number:
                    continue  # another process (adduser beside serve) got here first
                for statement in _statements(migrations[number]):
                    c.execute(statement)
                c.execute(f"PRAGMA user_version = {number:d}")

    def replaced(self):
        """Whether the file is gone, or another has taken its place, since
        migrate(): what is written now goes where no start will find it. Logs
        it, once."""
        replaced = self._file is not None and _file_identity(self.path) != self._file
        if replaced and not self._told_replaced:
            self._told_replaced = True
            log.error("the database %s was deleted or replaced while the server ran: what "
                      "it writes from now on is lost. Stop the server before you put a "
                      "database back", self.path)
        return replaced

    def close(self):
        """Close every connection, leaving the database whole in its file."""
        self._closed.set()
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            self._checkpoint_due.set()
            self._checkpoint_now.set()
            checkpointer.join(30)
        with self._connections_lock:
            if self._connections:
                with contextlib.suppress(sqlite3.Error):
                    # Not waiting: it would hold the write lock while it waits
                    # for readers, stalling other processes' writers for the
                    # busy timeout. If they are busy, the last to close empties the WAL.
                    self._connections[0].execute("PRAGMA busy_timeout = 0")
                    self._connections[0].execute("PRAGMA wal_checkpoint(TRUNCATE)")
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
        self._writer = None
        self._recent.clear()


def row_bytes(row):
    """Roughly the memory a row's text and blobs take."""
    return sum(len(value) for value in row if isinstance(value, (str, bytes)))


def _create_private(path):
    """Create the file `path` readable by its owner alone, unless it exists:
    builds' env and logs may hold secrets (SQLite gives a database's -wal and
    -shm files the database's own permissions)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _make_private_dir(path):
    """The data folder, made readable by its owner alone if it is new."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:  # a file: say what is wrong with it (it said "File exists")
        raise NotADirectoryError(errno.ENOTDIR, "Not a folder", path) from None


def _warn_if_open(*paths):
    """Say so when other users may read the data (a folder made before
    buildserver made it private, say): builds' env and logs may hold secrets."""
    for path in paths:
        with contextlib.suppress(OSError):
            mode = os.stat(path).st_mode & 0o777
            if mode & 0o077:
                log.warning("%s is open to other users (mode %03o): builds' env and logs "
                            "may hold secrets; chmod go-rwx it", path, mode)


def _file_identity(path):
    """(device, inode) of the file at `path`, or None if there is none."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_migrations(schema_path=SCHEMA_PATH):
    """{N: SQL} of schema.sql's `-- migration N` parts."""
    try:
        with open(schema_path, encoding="utf-8") as f:
            script = f.read()
    except OSError as e:
        raise SchemaError(f"cannot read {schema_path} ({e.strerror}); "
                          "schema.sql must sit beside buildserver.py") from None
    parts = re.split(r"^-- migration (\d+)\s*$", script, flags=re.M)
    migrations = {int(n): sql for n, sql in zip(parts[1::2], parts[2::2])}
    if max(migrations, default=0) != SCHEMA_VERSION:  # one file of the two was replaced
        raise SchemaError(
            f"{schema_path} is from another release than buildserver.py (its newest "
            f"migration is {max(migrations, default=0)}, buildserver.py's is {SCHEMA_VERSION}): "
            "copy buildserver.py and schema.sql together")
    return migrations


def _statements(script):
    """Split a migration into statements; executescript() would COMMIT ours."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


BUILD_SELECT = """
    SELECT b.*, p.name AS project_name, u.name AS owner
    FROM builds b JOIN projects p ON p.id = b.project_id JOIN users u ON u.id = p.owner_id
"""
# The last chunk that starts at or before byte :at, of the build with this id and uuid:
_CHUNK_AT = """
    FROM log_chunks c JOIN builds b ON b.id = c.build_id
    WHERE c.build_id = :build AND b.uuid = :uuid AND c.offset <= :at
    ORDER BY c.offset DESC LIMIT 1
"""
LOG_CHUNK_SELECT = "SELECT c.offset, c.data" + _CHUNK_AT  # all of it
LOG_PIECE_SELECT = "SELECT substr(c.data, :at - c.offset + 1, :length)" + _CHUNK_AT  # from :at
# The next build's and project's ids: never one a deleted row had (nor one inserted by hand).
NEXT_BUILD_ID = """
    SELECT max((SELECT next FROM build_ids), (SELECT coalesce(max(id), 0) + 1 FROM builds))
"""
NEXT_PROJECT_ID = """
    SELECT max((SELECT next FROM project_ids), (SELECT coalesce(max(id), 0) + 1 FROM projects))
"""
PROJECT_SELECT = """
    SELECT p.*, u.name AS owner,
           (SELECT number FROM builds WHERE project_id = p.id ORDER BY number DESC LIMIT 1)
               AS last_number,
           (SELECT last_status FROM builds WHERE project_id = p.id ORDER BY number DESC LIMIT 1)
               AS last_status
    FROM projects p JOIN users u ON u.id = p.owner_id
"""


# A log is cut (by its limit, or a page) between UTF-8 characters, never inside one.

def _utf8_length(lead):
    """How many bytes the UTF-8 sequence that starts with byte `lead` has (1 if
    `lead` cannot start one)."""
    return 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4 if lead >> 3 == 30 else 1


def _whole_characters(stored, data, room):
    """How many bytes of `data` to keep, about `room`, so that the log, which
    ends with `stored`, ends with a whole UTF-8 character: fewer when one begun
    in `data` would be cut in two, up to 3 more when one begun in `stored`
    would (what is stored may have been sent already: it stays), as far as
    `data` continues it."""
    joined = stored + bytes(data[:room + 3])
    cut = _utf8_boundary(joined[:len(stored) + room])
    if cut >= len(stored):
        return cut - len(stored)
    keep, end = len(stored), min(len(joined), cut + _utf8_length(joined[cut]))
    while keep < end and joined[keep] & 0xC0 == 0x80:  # continuation bytes
        keep += 1
    return keep - len(stored)


def _utf8_boundary(data):
    """The length of `data` without a UTF-8 character cut off at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): is its sequence whole?
            return len(data) if back >= _utf8_length(byte) else len(data) - back
    return len(data)


class Store:
    """The named queries: users and tokens, projects, builds, statuses, logs.

    :param on_change: called with a build's id and its new log size after its
        log grew, and with None for the size after the build ended (or was
        deleted before it did).
    """

    def __init__(self, db, on_change=lambda build_id, log_size: None):
        self.db = db
        self.on_change = on_change

    # Users and tokens --------------------------------------------------------

    def user_count(self):
        return self.db.one("SELECT count(*) FROM users")[0]

    def user_by_name(self, name):
        return self.db.one("SELECT * FROM users WHERE name = ?", (name,))

    def user_named_any_case(self, name):
        """The user whose name is `name` regardless of case (a name that would
        share its workspace folder on a case-insensitive file system)."""
        return self.db.one("SELECT * FROM users WHERE name = ? COLLATE NOCASE", (name,))

    def user_by_token(self, token):
        return self.db.recent(
            "SELECT u.* FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.hash = ?",
            (hash_token(token),))

    def create_user(self, name, is_admin=False, token=None):
        """A new user and its first token (the only time the token exists);
        None if a user has the name, regardless of case (looked up in the
        same transaction: two `adduser` at once cannot both make it)."""
        with self.db.write() as c:
            if self.user_named_any_case(name) is not None:
                return None
            user_id = c.execute(
                "INSERT INTO users (name, is_admin, created_at) VALUES (?, ?, ?)",
                (name, int(is_admin), now_iso())).lastrowid
            return self.new_token(user_id, token)

    def new_token(self, user_id, token=None):
        """Replace the user's tokens with a new one (`token`, or a fresh one), and return it."""
        token = token or fresh_token()
        with self.db.write() as c:
            c.execute("DELETE FROM tokens WHERE user_id = ?", (user_id,))
            c.execute("INSERT INTO tokens (hash, user_id, created_at) VALUES (?, ?, ?)",
                      (hash_token(token), user_id, now_iso()))
        return token

    # Projects ----------------------------------------------------------------

    def project(self, owner, name):
        return self.db.one(PROJECT_SELECT + " WHERE u.name = ? AND p.name = ?", (owner, name))

    def project_by_id(self, project_id):
        return self.db.one(PROJECT_SELECT + " WHERE p.id = ?", (project_id,))

    def projects(self, owner_id, limit, offset):
        with self.db.snapshot():
            count = self.db.one("SELECT count(*) FROM projects WHERE owner_id = ?",
                                (owner_id,))[0]
            rows = self.db.all(PROJECT_SELECT + " WHERE p.owner_id = ? ORDER BY p.name"
                               " LIMIT ? OFFSET ?", (owner_id, limit, offset))
        return count, rows

    def create_project(self, owner_id, fields):
        """Make a project; returns its id and None, or None and the name of
        the owner's project that has its name regardless of case: on a
        case-insensitive file system (macOS's default) the two would share
        their workspaces."""
        try:
            with self.db.write() as c:
                now = now_iso()  # (under the write lock, as for builds)
                taken = c.execute("SELECT name FROM projects WHERE owner_id = ?"
                                  " AND name = ? COLLATE NOCASE",
                                  (owner_id, fields["name"])).fetchone()
                if taken is not None:
                    return None, taken[0]
                project_id = c.execute(NEXT_PROJECT_ID).fetchone()[0]
                c.execute("UPDATE project_ids SET next = ?", (project_id + 1,))
                c.execute(
                    "INSERT INTO projects (id, owner_id, name, description, command, env, timeout,"
                    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (project_id, owner_id, fields["name"], fields.get("description"),
                     fields.get("command"), json.dumps(fields.get("env") or {}),
                     fields.get("timeout"), now, now))
        except sqlite3.IntegrityError:
            return None, fields["name"]
        return project_id, None

    def update_project(self, project_id, fields):
        self._update("projects", project_id, fields, {"env": {}})

    def _update(self, table, row_id, fields, json_columns):
        """Set validated `fields` (plus updated_at) of a row; `json_columns` maps
        the JSON columns to what null stands for."""
        values = {**fields, "updated_at": None}
        for column, empty in json_columns.items():
            if column in values:
                values[column] = json.dumps(values[column] or empty)
        # The table and column names come from this module, never from a request.
        assignments = ", ".join(f"{column} = :{column}" for column in values)
        with self.db.write() as c:
            values["updated_at"] = now_iso()  # (under the write lock, as statuses are)
            c.execute(f"UPDATE {table} SET {assignments} WHERE id = :id", {**values, "id": row_id})

    def delete_project(self, project_id):
        """Delete a project and all it holds; False if it was gone already."""
        with self.db.write() as c:
            self._tell_ended(*self.active_builds(project_id))
            deleted = c.execute("DELETE FROM projects WHERE id = ?", (project_id,)).rowcount
        return deleted == 1

    def _tell_ended(self, *build_ids):
        """Once committed, the builds' followers end: the builds ended, or were
        deleted (the bus would keep a running one for ever). In commit order:
        an end is the last news a build's followers get."""
        for build_id in build_ids:
            self.db.after_commit(functools.partial(self.on_change, build_id, None))

    # Builds ------------------------------------------------------------------

    def build(self, build_id):
        return self.db.one(BUILD_SELECT + " WHERE b.id = ?", (build_id,))

    def label(self, build_id):
        """How the server's log names a build."""
        with contextlib.suppress(sqlite3.Error):
            build = self.build(build_id)
            if build is not None:
                return build_label(build)
        return f"build {build_id} (internal id)"

    def build_at(self, owner, project_name, number):
        """A build by its path, in one query: build routes need no project row."""
        return self.db.recent(BUILD_SELECT + " WHERE u.name = ? AND p.name = ? AND b.number = ?",
                              (owner, project_name, number))

    def builds(self, project_id, statuses, limit, offset):
        """A page of the project's builds, newest first, and how many there are
        (None if the project is gone)."""
        with self.db.snapshot():
            counted = self.db.one("SELECT builds_count FROM projects WHERE id = ?", (project_id,))
            if counted is None:
                return None
            if not statuses:
                return counted[0], self.db.all(BUILD_SELECT + " WHERE b.project_id = ?"
                                               " ORDER BY b.number DESC LIMIT ? OFFSET ?",
                                               (project_id, limit, offset))
            wanted = json.dumps(sorted(statuses))
            count = self.db.one("SELECT count(*) FROM builds WHERE project_id = ? AND last_status"
                                " IN (SELECT value FROM json_each(?))", (project_id, wanted))[0]
            rows = self.db.all(BUILD_SELECT + " WHERE b.project_id = ? AND b.last_status IN"
                               " (SELECT value FROM json_each(?)) ORDER BY b.number DESC"
                               " LIMIT ? OFFSET ?", (project_id, wanted, limit, offset))
        return count, rows

    def bookmarked_builds(self, owner_id, limit, offset):
        """A page of the bookmarked builds of the user's projects, newest first,
        and how many there are."""
        with self.db.snapshot():
            count = self.db.one("SELECT count(*) FROM builds b JOIN projects p"
                                " ON p.id = b.project_id WHERE p.owner_id = ? AND b.bookmarked = 1",
                                (owner_id,))[0]
            rows = self.db.all(BUILD_SELECT + " WHERE p.owner_id = ? AND b.bookmarked = 1"
                               " ORDER BY b.id DESC LIMIT ? OFFSET ?", (owner_id, limit, offset))
        return count, rows

    def create_build(self, project_id, user, fields, restarted_from=None, running=False):
        """Record a build `created` (and `scheduled` if managed, and `running`
        too if `running`); returns its row as made, or None if the project was
        deleted meanwhile."""
        managed = fields.get("is_managed", True)
        with self.db.write() as c:
            now = now_iso()  # under the write lock: in the order of the numbers
            row = c.execute("SELECT next_number FROM projects WHERE id = ?",
                            (project_id,)).fetchone()
            if row is None:
                return None
            number = row[0]
            c.execute("UPDATE projects SET next_number = next_number + 1,"
                      " builds_count = builds_count + 1 WHERE id = ?", (project_id,))
            build_id = c.execute(NEXT_BUILD_ID).fetchone()[0]
            c.execute("UPDATE build_ids SET next = ?", (build_id + 1,))
            c.execute(
                "INSERT INTO builds (id, project_id, number, uuid, user, name, description, tags,"
                " last_status, is_managed, command, env, timeout, created_at, updated_at,"
                " restarted_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'created', ?, ?, ?, ?, ?, ?, ?)",
                (build_id, project_id, number, uuidlib.uuid4().hex, user, fields.get("name"),
                 fields.get("description"), json.dumps(fields.get("tags") or []), int(managed),
                 fields.get("command"), json.dumps(fields.get("env") or {}),
                 fields.get("timeout"), now, now, restarted_from))
            self._add_status(c, build_id, "created", None, now)
            if managed:
                self._set_status(c, build_id, "scheduled", "a worker is free" if running
                                 else "waiting for a free worker", now)
            if managed and running:
                self._set_status(c, build_id, "running", "started", now)
            return self.build(build_id)

    def update_build(self, build_id, fields):
        self._update("builds", build_id, fields, {"tags": [], "code_reference": {}})

    def add_tags(self, build_id, tags):
        """Add the tags a build lacks, after its own; False if it would then
        have too many (nothing changes)."""
        with self.db.write() as c:
            row = c.execute("SELECT tags FROM builds WHERE id = ?", (build_id,)).fetchone()
            if row is None:
                return True  # (gone: the answer's re-read says so)
            have = json.loads(row[0] or "[]")
            merged = have + [t for t in dict.fromkeys(tags) if t not in have]
            if len(merged) > FIELDS["tags"]["maxItems"]:
                return False
            if merged == have:
                return True  # (no change: updated_at stays)
            c.execute("UPDATE builds SET tags = ?, updated_at = ? WHERE id = ?",
                      (json.dumps(merged), now_iso(), build_id))
        return True

    def bookmark(self, build_id, bookmarked):
        """Mark or unmark a build (not a change to the build: updated_at stays)."""
        with self.db.write() as c:
            c.execute("UPDATE builds SET bookmarked = ? WHERE id = ?", (int(bookmarked), build_id))

    def delete_build(self, build_id):
        """Delete a build and all it holds; False if it was gone already."""
        with self.db.write() as c:
            row = c.execute("SELECT project_id FROM builds WHERE id = ?",
                            (build_id,)).fetchone()
            if row is None:
                return False
            c.execute("UPDATE projects SET builds_count = builds_count - 1 WHERE id = ?",
                      (row[0],))
            c.execute("DELETE FROM builds WHERE id = ?", (build_id,))
            self._tell_ended(build_id)
        return True

    def set_pgid(self, build_id, pgid, started):
        with self.db.write() as c:
            c.execute("UPDATE builds SET pgid = ?, pg_started = ? WHERE id = ?",
                      (pgid, started, build_id))

    def transition(self, build_id, status, message=None, sources=None, exit_code=None):
        """Move a build to `status` if the status machine (and `sources`) allow it.

        :returns: the new status entry, or None when the move is not allowed.
        """
        with self.db.write() as c:
            now = now_iso()  # under the write lock: in the order of the statuses
            row = c.execute("SELECT last_status FROM builds WHERE id = ?", (build_id,)).fetchone()
            if (row is None or status not in TRANSITIONS[row[0]]
                    or (sources is not None and row[0] not in sources)):
                return None
            entry = self._set_status(c, build_id, status, message, now, exit_code)
            if status in FINAL:  # followers wait for output or the end, nothing between
                self._tell_ended(build_id)
        return entry

    def report(self, build_id, status, message=None):
        """Record a status that what runs an unmanaged build reported; the
        entry, or None if the status machine forbids it. That may never read
        the build back (Polyaxon's tracking client does not): its `stopped`
        from `running` goes through `stopping`, and its `succeeded` after a
        stop was asked ends the build `stopped`, as a managed build's exit
        does (else it would stay `stopping` for good). One transaction: a
        stop in between would refuse the rest of the way."""
        with self.db.write() as c:
            now = now_iso()
            row = c.execute("SELECT last_status FROM builds WHERE id = ?", (build_id,)).fetchone()
            current = None if row is None else row[0]
            if current is None:
                return None
            if status in TRANSITIONS[current]:
                steps = [(status, message)]
            elif (current, status) == ("running", "stopped"):
                steps = [("stopping", message), ("stopped", message)]
            elif (current, status) == ("stopping", "succeeded"):
                steps = [("stopped", message or "it succeeded after its stop was asked")]
            else:
                return None
            for step, said in steps:
                entry = self._set_status(c, build_id, step, said, now)
            if entry["status"] in FINAL:
                self._tell_ended(build_id)
        return entry

    def _set_status(self, c, build_id, status, message, now, exit_code=None):
        c.execute("UPDATE builds SET last_status = :status, updated_at = :now,"
                  " started_at = coalesce(:started, started_at),"
                  " finished_at = coalesce(:finished, finished_at),"
                  " exit_code = coalesce(:exit_code, exit_code)"
                  " WHERE id = :id", {"status": status, "now": now, "id": build_id,
                                      "started": now if status == "running" else None,
                                      "finished": now if status in FINAL else None,
                                      "exit_code": exit_code})
        return self._add_status(c, build_id, status, message, now)

    def _add_status(self, c, build_id, status, message, now):
        number = c.execute("SELECT coalesce(max(number), 0) + 1 FROM statuses WHERE build_id = ?",
                           (build_id,)).fetchone()[0]
        entry_uuid = uuidlib.uuid4().hex
        c.execute("INSERT INTO statuses (build_id, number, uuid, status, message, created_at)"
                  " VALUES (?, ?, ?, ?, ?, ?)",
                  (build_id, number, entry_uuid, status, message, now))
        return {"number": number, "uuid": entry_uuid, "status": status,
                "message": message, "created_at": now}

    def last_server(self):
        """(pid, started, pid namespace) of the server that last started on
        this database, or None."""
        row = self.db.one("SELECT pid, started, pid_namespace FROM server_process")
        return None if row is None else tuple(row)

    def take_over(self, *server):
        """Record `server` (pid, started, pid namespace) as the database's."""
        with self.db.write() as c:
            c.execute("DELETE FROM server_process")
            c.execute("INSERT INTO server_process (pid, started, pid_namespace) VALUES (?, ?, ?)",
                      server)

    def forget_processes(self):
        """Forget every build's process group: they are another server's."""
        with self.db.write() as c:
            c.execute("UPDATE builds SET pgid = NULL, pg_started = NULL WHERE pgid IS NOT NULL")

    def sessions(self, uuids, project_id=None):
        """{uuid: the session its shell led} of the ended builds with these
        uuids that ran here (of one project, if given)."""
        return dict(self.db.all("SELECT uuid, pgid FROM builds WHERE pgid IS NOT NULL AND uuid IN"
                                " (SELECT value FROM json_each(?1))"
                                " AND (?2 IS NULL OR project_id = ?2)"
                                " AND last_status IN (SELECT value FROM json_each(?3))",
                                (json.dumps(list(uuids)), project_id, json.dumps(sorted(FINAL)))))

    def backup_taken(self):
        """When `backup` copied this file, if it is such a copy (restored) not
        yet started on; else None."""
        row = self.db.one("SELECT taken_at FROM backup_taken")
        return row and row[0]

    def end_restored(self, taken_at):
        """End the managed builds that waited when the backup was taken, and
        forget that it was one (at the first start on a restored copy). Not
        those made since: an older release, restored onto, kept the mark."""
        message = (f"not run: the database was restored from a backup taken at {taken_at}, "
                   "while this build waited (it may have run since)")
        with self.db.write() as c:
            for (build_id,) in c.execute(
                    "SELECT id FROM builds WHERE is_managed = 1 AND created_at <= ? AND"
                    " last_status IN (SELECT value FROM json_each(?))",
                    (taken_at, json.dumps(WAITING))).fetchall():
                self._set_status(c, build_id, "stopped", message, now_iso())
            c.execute("DELETE FROM backup_taken")

    def managed_builds(self, statuses):
        """Managed builds in `statuses`, oldest first."""
        return self.db.all("SELECT id, uuid, pgid, pg_started, last_status, created_at FROM builds"
                           " WHERE is_managed = 1"
                           " AND last_status IN (SELECT value FROM json_each(?)) ORDER BY id",
                           (json.dumps(list(statuses)),))

    def active_builds(self, project_id):
        return [r["id"] for r in self.db.all(
            "SELECT id FROM builds WHERE project_id = ? AND last_status IN"
            " (SELECT value FROM json_each(?))", (project_id, json.dumps(ACTIVE)))]

    def runs_builds(self, project_id):
        """Whether a build of the project that this server runs has started and not ended."""
        return self.db.one("SELECT 1 FROM builds WHERE project_id = ? AND is_managed = 1"
                           " AND last_status IN (SELECT value FROM json_each(?)) LIMIT 1",
                           (project_id, json.dumps(STARTED))) is not None

    # Statuses ----------------------------------------------------------------

    def statuses(self, build_id, limit, offset):
        with self.db.snapshot():
            count = self.db.one("SELECT count(*) FROM statuses WHERE build_id = ?",
                                (build_id,))[0]
            rows = self.db.all("SELECT * FROM statuses WHERE build_id = ? ORDER BY number"
                               " LIMIT ? OFFSET ?", (build_id, limit, offset))
        return count, rows

    def status(self, build_id, number=None, uuid=None):
        return self.db.one("SELECT * FROM statuses WHERE build_id = ? AND (number = ? OR uuid = ?)",
                           (build_id, number, uuid))

    # Logs --------------------------------------------------------------------

    # A reader that outlives a request (a download, a follower) names its
    # build by id and uuid: the build may be deleted meanwhile, and its id
    # made again (by a restore from a backup).

    def log_state(self, build_id, uuid):
        return self.db.one("SELECT log_size, last_status FROM builds WHERE id = ? AND uuid = ?",
                           (build_id, uuid))

    def append_log(self, build_id, data, max_bytes):
        """Store output as it arrived; past `max_bytes` it is dropped and one
        line says so. Returns (log size, truncated), or None if the build is gone.
        Raises LogClosed once the build is final (its followers have ended)."""
        with self.db.write() as c:
            row = c.execute("SELECT log_size, truncated, last_status FROM builds WHERE id = ?",
                            (build_id,)).fetchone()
            if row is None:
                return None
            size, truncated, status = row
            if status in FINAL:
                raise LogClosed(status)
            if truncated or not data:
                return size, bool(truncated)
            if size + len(data) > max_bytes:
                stored = c.execute("SELECT substr(data, -3) FROM log_chunks WHERE build_id = ?"
                                   " ORDER BY offset DESC LIMIT 1", (build_id,)).fetchone()
                stored = stored[0] if stored else b""  # (what the log ends with, so far)
                kept = bytes(data[:_whole_characters(stored, data, max(0, max_bytes - size))])
                ends_line = (stored + kept).endswith(b"\n") or not (stored + kept)
                data = kept + (b"" if ends_line else b"\n") + (
                    f"[buildserver] log truncated: it reached --max-log-bytes ({max_bytes} "
                    "bytes); later output was dropped\n").encode()
                truncated = True
            last = c.execute("SELECT id, length(data) FROM log_chunks WHERE build_id = ?"
                             " ORDER BY offset DESC LIMIT 1", (build_id,)).fetchone()
            view, written = memoryview(data), len(data)
            if last is not None and last[1] + len(view) <= LOG_JOIN:
                # Small writes join a small last chunk, so a trickling log stays
                # few rows without rewriting much at each write.
                joined = c.execute("SELECT data FROM log_chunks WHERE id = ?",
                                   (last[0],)).fetchone()[0] + bytes(view)
                c.execute("UPDATE log_chunks SET data = ? WHERE id = ?", (joined, last[0]))
                size, written = size + len(view), len(joined)
                view = view[len(view):]
            for start in range(0, len(view), LOG_CHUNK):
                piece = view[start:start + LOG_CHUNK]
                c.execute("INSERT INTO log_chunks (build_id, offset, data) VALUES (?, ?, ?)",
                          (build_id, size, piece))
                size += len(piece)
            c.execute("UPDATE builds SET log_size = ?, truncated = ? WHERE id = ?",
                      (size, int(truncated), build_id))
            self.db.wrote(written)
            # In commit order: a build's end is the last news its followers get.
            self.db.after_commit(functools.partial(self.on_change, build_id, size))
        return size, bool(truncated)

    def log_piece(self, build_id, uuid, start, end):
        """Bytes from `start` up to `end`, at most to the end of one chunk."""
        if start >= end:
            return b""
        row = self.db.one(LOG_PIECE_SELECT, {"build": build_id, "uuid": uuid, "at": start,
                                             "length": end - start})
        return b"" if row is None else row[0]

    def log_chunk(self, build_id, uuid, pos):
        """(offset, data) of the chunk that holds byte `pos`, or (pos, b"")."""
        row = self.db.one(LOG_CHUNK_SELECT, {"build": build_id, "uuid": uuid, "at": pos})
        return (pos, b"") if row is None else (row[0], row[1])

    def log_bytes(self, build_id, uuid, start, end):
        pieces, pos = [], start
        while pos < end:
            piece = self.log_piece(build_id, uuid, pos, end)
            if not piece:
                break
            pieces.append(piece)
            pos += len(piece)
        return b"".join(pieces)

    def tail_offset(self, build_id, size, lines):
        """Where the last `lines` lines of a log of `size` bytes start."""
        pos, wanted = size, lines
        if lines == 0:
            return size
        while pos > 0:
            row = self.db.one("SELECT offset, data FROM log_chunks WHERE build_id = ?"
                              " AND offset < ? ORDER BY offset DESC LIMIT 1", (build_id, pos))
            if row is None:
                break
            data = row["data"][:pos - row["offset"]]
            end = len(data) - 1 if pos == size and data.endswith(b"\n") else len(data)
            while True:
                newline = data.rfind(b"\n", 0, end)
                if newline < 0:
                    break
                wanted -= 1
                if wanted == 0:
                    return row["offset"] + newline + 1
                end = newline
            pos = row["offset"]
        return 0


###############################################################################
# Auth ########################################################################
###############################################################################

def hash_token(token):
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def fresh_token():
    """A new token; never one that starts with "-", which `--token` would take for an option."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


AUTH_RE = re.compile(r'^\s*(?:token|bearer)\s+("?)([^"\s]+)\1\s*$', re.I)  # (quotes: both or none)


class AuthThrottle:
    """Counts failed authentications per client address. Past `burst` failures
    within `window` seconds, that address's failures get 429 instead of 401.
    A valid token is never throttled (tokens are far too long to guess: this
    keeps scanners from filling the log and the CPU, not from guessing)."""

    def __init__(self, burst, window=60.0):
        self.burst, self.window = burst, window
        self._failures = {}
        self._prune_above = 10000  # addresses, before quiet ones are forgotten
        self._lock = threading.Lock()

    def forget_quiet(self):
        """Forget the addresses whose last failure is a window old (called
        every 30 s: after an attack from many addresses, none may fail again)."""
        with self._lock:
            self._forget_quiet(time.monotonic())

    def _forget_quiet(self, now):
        self._failures = {a: t for a, t in self._failures.items() if t[-1] > now - self.window}
        # Not again at each failure while that many fail at once (an attacker
        # with many addresses): a rebuild per failure is slow.
        self._prune_above = max(10000, 2 * len(self._failures))

    def failed(self, address):
        """Record a failure; seconds until `address` may fail again, or 0."""
        if not self.burst:
            return 0
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > self._prune_above:
                self._forget_quiet(now)
            times = self._failures.setdefault(address, collections.deque(maxlen=self.burst + 1))
            times.append(now)
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) <= self.burst:
                return 0
            return max(1, int(times[0] + self.window - now + 1))


def authenticate(store, throttle):
    """The user whose token the request carries, or ApiError(401) (429 when
    the address has failed too often; a request with no token at all tried
    nothing, and is told its token is missing)."""
    environ = bottle.request.environ
    header = environ.get("HTTP_AUTHORIZATION", "")
    user = _token_user(store, header)
    if user is None:
        retry = throttle.failed(environ.get("REMOTE_ADDR", "")) if header else 0
        if retry:
            raise ApiError(429, "Too many failed authentications from your address; "
                                f"try again in {retry} s.", headers={"Retry-After": str(retry)})
        reason = "is missing" if not header else \
            "is not valid" if AUTH_RE.match(header) else "is malformed"
        raise ApiError(401, f"Authentication failed: the token {reason}. Send the header "
                            "'Authorization: Token <your token>'.",
                       headers={"WWW-Authenticate": "Token"})
    bottle.request.environ["buildserver.user"] = user["name"]
    return user


def _token_user(store, header):
    """The user whose token the Authorization `header` carries, or None."""
    match = AUTH_RE.match(header)
    return store.user_by_token(match.group(2)) if match else None


def _still_authenticated(store, user_id, header):
    """Whether the token in the Authorization `header` of a request answered
    still belongs to the user `user_id` (for a follow, which may last days)."""
    user = _token_user(store, header)
    return user is not None and user["id"] == user_id


def token_required(handler):
    """Decorator: authenticate, then allow a user only inside their own namespace
    (admins everywhere). Access is checked before existence: a 403 never tells
    whether a project or build exists. The handler gets the user after the App."""
    @functools.wraps(handler)
    def wrapper(app, **params):
        username = params.get("username")
        if username in RESERVED_USERNAMES and \
                bottle.request.route.rule.startswith("/api/v1/<username>"):  # /api/v1/health/x
            raise ApiError(404, _no_endpoint(bottle.request.path))
        user = authenticate(app.store, app.throttle)
        if username is not None and not user["is_admin"] and username != user["name"]:
            raise ApiError(403, f"You may act only inside your own namespace /api/v1/{user['name']}.")
        if bottle.request.route.config.get("bodiless"):
            refuse_body()
        return handler(app, user, **params)
    wrapper.needs_token = True  # (the OpenAPI document says so)
    return wrapper


###############################################################################
# Log followers ###############################################################
###############################################################################

class LogBus:
    """Wakes a build's log followers when there is something for them: output
    past the position they wait at, or the build's end. Other builds' output
    never wakes them, nor does output that stays short of their position."""

    ENDED = (-1, math.inf)  # the news of a build that has ended: past every position
    KEPT_ENDED = 10000      # ended builds remembered, then forgotten all at once

    def __init__(self):
        self._lock = threading.Lock()
        self._news = {}  # build id -> (changes so far, log size), or ENDED
        self._waiting = {}  # build id -> {waiter: position}
        self._ended = 0  # builds ended since the last were forgotten
        self.closed = False
        self.last_call = math.inf  # once closed: when followers still sending are cut off

    def news(self, build_id):
        """What the bus last heard of the build; wait() compares against it."""
        return self._news.get(build_id, (0, 0))

    def notify(self, build_id, log_size=None):
        """The build's log has grown to `log_size`; None: the build has ended.
        Notices come in commit order (the store sends them after each commit,
        under the write lock), so an end is never followed by older news."""
        with self._lock:
            if log_size is None:
                self._ended += 1
                if self._ended > self.KEPT_ENDED:  # else one entry per build, for ever
                    self._news = {b: n for b, n in self._news.items() if n != self.ENDED}
                    self._ended = 0
            changes = self.news(build_id)[0]
            news = self._news[build_id] = \
                self.ENDED if log_size is None else (changes + 1, log_size)
            for waiter, position in list(self._waiting.get(build_id, {}).items()):
                if news[1] > position:
                    self._forget(build_id, waiter)
                    waiter.release()

    def wait(self, build_id, seen, position, timeout, gone=lambda: False):
        """Until news after `seen` passes `position`, the bus closes, wake()
        or `timeout`; not at all if `gone()` (checked where wake() cannot
        slip in between)."""
        waiter = threading.Lock()
        waiter.acquire()
        with self._lock:
            news = self.news(build_id)
            if self.closed or gone() or (news != seen and news[1] > position):
                return
            self._waiting.setdefault(build_id, {})[waiter] = position
        if not waiter.acquire(timeout=timeout):
            with self._lock:
                self._forget(build_id, waiter)

    def wake(self, build_id):
        """Wake the build's followers to look again (one's client has gone)."""
        with self._lock:
            for waiter in self._waiting.pop(build_id, {}):
                waiter.release()

    def _forget(self, build_id, waiter):
        waiting = self._waiting.get(build_id, {})
        waiting.pop(waiter, None)
        if not waiting:
            self._waiting.pop(build_id, None)

    def close(self):
        with self._lock:
            self.closed = True
            self.last_call = time.monotonic() + FOLLOW_SHUTDOWN_SECONDS
            for waiting in self._waiting.values():
                for waiter in waiting:
                    waiter.release()
            self._waiting.clear()


class LogFile:
    """A stored range of a build's log as a seekable, read-only file.

    Bottle hands it to waitress's file wrapper, which sends it from its event
    loop straight to the socket, a piece at a time: a 100 MB log never sits in
    memory, nor in waitress's buffers. Positions are the log's byte offsets.
    """

    def __init__(self, store, build, start, end):
        self.store, self.build_id, self.uuid = store, build["id"], build["uuid"]
        self.label = build_label(build)
        self.pos, self.end = start, end
        self._base, self._chunk = start, b""  # the chunk last read, from byte _base

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        base = (0, self.pos, self.end)[whence]
        self.pos = min(max(0, base + offset), self.end)
        return self.pos

    def read(self, size=-1):
        stop = self.end if size is None or size < 0 else min(self.end, self.pos + size)
        pieces = []
        while self.pos < stop:
            if not self._base <= self.pos < self._base + len(self._chunk):
                self._base, self._chunk = self.store.log_chunk(self.build_id, self.uuid, self.pos)
                if not self._base <= self.pos < self._base + len(self._chunk):
                    # Short of Content-Length, the server would wait for bytes
                    # that never come: abort the connection instead.
                    log.info("%s was deleted while its log was sent: connection closed",
                             self.label)
                    raise ConnectionAbortedError("the build was deleted while its log was sent")
            piece = self._chunk[self.pos - self._base:stop - self._base]
            pieces.append(piece)
            self.pos += len(piece)
        return b"".join(pieces)

    def close(self):
        self._chunk = b""


class LogStream:
    """A followed log, from `start` until `end` or the build is final, as a
    file-like object for the server.

    Returned from a handler, Bottle gives it to waitress's file wrapper without
    peeking at it, so the response headers can go out (through the WSGI
    `write`) before the first output exists. Each read() returns what one chunk
    holds, waiting for more when there is none yet.

    What it needs of the server comes in the WSGI environ, from App.__call__
    and, under waitress, from the channel's Task (see _channel_class); under
    another server (webtest) each may be missing, and the follow does without:
        buildserver.write       the WSGI write(): the headers go out at once
        buildserver.when_gone   when_gone(callback): called once the client leaves
        buildserver.backlog     backlog(): bytes still waiting for the client
        buildserver.hang_up     hang_up(): close the connection of a follower
                                that took nothing (it would never close itself)
    """

    def __init__(self, store, bus, build, start, end, environ, on_close, allowed):
        """:param allowed: whether the request's token still works: a follow
        of a token replaced since ends within FOLLOW_WAIT_SECONDS."""
        self.store, self.bus, self.build_id, self.uuid = store, bus, build["id"], build["uuid"]
        self.label = build_label(build)  # (the row's id means nothing to its owner)
        self.pos, self.end = start, end
        self._environ, self._on_close, self._allowed = environ, on_close, allowed
        self._gone = environ.get("waitress.client_disconnected") or (lambda: False)
        self._headers_sent = False

    def read(self, size=-1):
        while self.pos < self.end:
            if not self._client_keeps_up():  # cut off, not ended: the build goes on
                raise ConnectionAbortedError("the follower's client stopped reading")
            if not self._allowed():
                raise ConnectionAbortedError("the follower's token was replaced")
            seen = self.bus.news(self.build_id)
            state = self.store.log_state(self.build_id, self.uuid)
            if state is None:  # deleted
                return b""
            piece = self.store.log_piece(self.build_id, self.uuid, self.pos,
                                         min(self.end, state["log_size"]))
            if piece:
                self.pos += len(piece)
                return piece
            if state["last_status"] in FINAL or self._gone():
                return b""  # (gone: free the thread and the follower slot)
            if self.bus.closed:  # its builds stopped, the server ends this one's wait
                raise ConnectionAbortedError("the server shut down before the build ended")
            if not self._headers_sent:  # before waiting, send the headers
                self._headers_sent = True
                write = self._environ.get("buildserver.write")
                if write is not None:  # set once the response has started
                    write(b"")
                self._when_client_goes(functools.partial(self.bus.wake, self.build_id))
            self.bus.wait(self.build_id, seen, self.pos, FOLLOW_WAIT_SECONDS, self._gone)
        return b""

    def _when_client_goes(self, callback):
        when_gone = self._environ.get("buildserver.when_gone")
        if when_gone is not None:  # (served by waitress through http_server)
            when_gone(callback)

    def _client_keeps_up(self):
        """Wait while more than FOLLOW_BACKLOG bytes wait for the client: one
        that stops reading (`logs -f | less`, a suspended curl) holds that much
        here, not the whole log. False once it has taken nothing for
        FOLLOW_STALL_SECONDS, or has gone: the answer is cut off, which frees its
        thread and follower slot (a client that comes back follows on from its
        offset). At shutdown a client gets the rest until the bus's last call,
        unless it takes nothing for SHUTDOWN_STALL_SECONDS (counted from the
        shutdown at most): not one second, as what waitress holds for a slow
        client shrinks in bursts, as the kernel's buffers empty."""
        if time.monotonic() >= self.bus.last_call:
            return False
        backlog = self._environ.get("buildserver.backlog")
        if backlog is None or backlog() <= FOLLOW_BACKLOG:
            return True
        least, took_at, closed = backlog(), time.monotonic(), self.bus.closed
        while not self._gone():
            time.sleep(0.1)  # a rare case, and no event says a client read
            waiting, now = backlog(), time.monotonic()
            if waiting <= FOLLOW_BACKLOG:
                return True
            if waiting < least or self.bus.closed and not closed:  # it reads, or a new clock
                least, took_at, closed = waiting, now, self.bus.closed
            if now >= self.bus.last_call:
                log.warning("a follower of %s was cut off by the shutdown", self.label)
                return False
            if now - took_at >= (SHUTDOWN_STALL_SECONDS if closed else FOLLOW_STALL_SECONDS):
                log.warning("a follower of %s took nothing for %.0f s: connection closed",
                            self.label, now - took_at)
                self._environ.get("buildserver.hang_up", lambda: None)()  # (nor would it later)
                return False
        return False

    def close(self):
        self._when_client_goes(None)
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


###############################################################################
# Runner ######################################################################
###############################################################################

class Job:
    """A managed build while a worker runs it."""

    def __init__(self, build):
        self.build = build
        self.id = build["id"]
        self.label = build_label(build)  # for the server's log
        self.ending = None          # (final status, message) once a stop or timeout is asked
        self.stopping = False       # the build has been moved to `stopping`
        self.finishing = False      # its end is decided: stops come too late
        self.exited = False         # the shell has exited (not yet reaped), as the worker saw
        self.exit_fd = None         # a pidfd of its shell, readable once it has exited
        self.pgid = None            # its shell's process group, once started
        self.started_at = None      # on the monotonic clock: when its command started
        self.grace_ends = None      # once SIGTERM is sent (a stop, a timeout): SIGKILL then
        self.signalled_tick = None  # when, in clock ticks since boot (see _terminate_older)
        self.member_fd = None       # after a stop, a pidfd of what is left in its group
        self.told = threading.Event()  # a stop is recorded (`stopping`), or it has ended
        self.done = threading.Event()
        self.gone = threading.Event()  # done, and the groups it made besides its own are gone
        self._lock = threading.Lock()
        self.woken_fd, self._wake_w = os.pipe()  # readable once wake() was called

    def stop(self, status, message):
        """Ask the worker to end the build `status` with `message` (first ask
        wins; once the build is finishing, or its shell has exited, nothing
        changes how it ends, though the worker may not have seen the exit
        yet: it was held up storing output, say)."""
        with self._lock:
            if self.ending is None and not self.finishing and not self._shell_exited():
                self.ending = (status, message)
        self.wake()

    def _shell_exited(self):
        """(Under _lock.) Whether the shell has exited, seen by the worker or
        not yet: its pidfd is readable from then on."""
        if self.exited or self.exit_fd is None:
            return self.exited
        poller = select.poll()
        poller.register(self.exit_fd, select.POLLIN)
        return bool(poller.poll(0))

    def finish(self):
        """The (status, message) a stop or timeout asked for, or None; after
        this call no stop can change how the build ends."""
        with self._lock:
            self.finishing = True
            return self.ending

    def wake(self):
        with self._lock:
            if self._wake_w is not None:
                os.write(self._wake_w, b".")

    def watch_member(self, pid):
        """A pidfd that turns readable when process `pid`, left in the
        build's group after a stop, ends (None without pidfds, or if it has)."""
        with contextlib.suppress(AttributeError, OSError):
            self.member_fd = os.pidfd_open(pid)
        return self.member_fd

    def unwatch_member(self):
        os.close(self.member_fd)
        self.member_fd = None

    def close(self):
        with self._lock:
            os.close(self.woken_fd)
            os.close(self._wake_w)
            self._wake_w = None
            if self.exit_fd is not None:  # (under the lock: a stop may be looking at it)
                os.close(self.exit_fd)
                self.exit_fd = None
        if self.member_fd is not None:
            self.unwatch_member()


SHUT_DOWN = ("stopped", "stopped: the server shut down")  # how a shutdown ends a running build


class _Handoff:
    """A worker kept for a build while it is created (see Runner.create)."""

    def __init__(self):
        self.ready = threading.Event()
        self.build_id = None  # set if it was created running,
        self.job = None       # with its Job,
        self.error = None     # or why none could be made


class Runner:
    """Runs managed builds: `workers` at a time, first come first served.

    Lifecycle: start() recovers what a dead server left and starts the workers;
    create() makes a build and runs it (at once if a worker is free, else
    queued); stop() ends one; shutdown() stops the
    running builds and waits for the workers, leaving the rest scheduled.
    """

    def __init__(self, config, store):
        self.config = config
        self.store = store
        self._cond = threading.Condition()  # guards _queue, _handoffs and _idle
        # Guards _jobs; held while a build is claimed (or created running) or
        # stopped, so that a stop sees either `scheduled` in the database or a
        # Job, never neither.
        self._lock = threading.Lock()
        self._queue = collections.deque()  # ids of the builds waiting their turn
        self._handoffs = collections.deque()  # builds made running for idle workers: first
        self._idle = 0  # workers waiting for either
        self._jobs = {}
        self._closing = threading.Event()  # set (under _cond) when shutdown begins
        self._threads = []
        self._local = threading.local()  # each worker's output buffer
        self.cores = None  # the cores builds run on, when the server's threads keep to one

    def _output_buffer(self):
        """This worker's buffer for build output, made at its first output and
        kept: reading into it allocates nothing (a fresh bytes object per read
        costs page faults and a copy; a buffer per build, a memset)."""
        view = getattr(self._local, "view", None)
        if view is None:
            view = self._local.view = memoryview(bytearray(LOG_CHUNK + PIPE_SIZE))
        return view

    def start(self):
        self.recover()
        with self._cond:
            self._queue.extend(r["id"] for r in self.store.managed_builds(["scheduled"]))
        for number in range(self.config.workers):
            thread = threading.Thread(target=self._work, name=f"worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _enqueue(self, build_id):
        with self._cond:
            self._queue.append(build_id)
            self._cond.notify()

    def create(self, make):
        """Make a managed build and run it: `make(running)` records it
        (`running` too, if asked) and returns its row, or None if its project
        is gone. Returns that row.

        When a worker is idle and no build waits, the build is made already
        `running` and handed straight to that worker: one commit less before
        its command starts. Otherwise it is made `scheduled` and queued.
        """
        with self._cond:
            handoff = None
            if not self._closing.is_set() and not self._queue and \
                    self._idle > len(self._handoffs):
                handoff = _Handoff()  # an idle worker takes it, and waits for it
                self._handoffs.append(handoff)
                self._cond.notify()
        if handoff is None:
            build = make(False)
            if build is not None:
                self._enqueue(build["id"])
            return build
        try:
            with self._lock:  # as in _claim: a stop finds a running build's Job
                if self._closing.is_set():  # stops are under way: it waits for the next start
                    return make(False)
                build = make(True)
                handoff.build_id = build and build["id"]
                try:
                    if build is not None:
                        handoff.job = self._jobs[build["id"]] = Job(build)
                except Exception as e:  # e.g. no file descriptors: its worker ends it
                    handoff.error = e
            return build
        finally:
            handoff.ready.set()

    def running(self, build_id):
        """Whether this server is running the build (a stop then waits for it)."""
        return build_id in self._jobs

    def stop(self, build_id, message, wait=0.0, told=0.0, whole=False):
        """Stop a build: at once if it has not started, else through SIGTERM.

        :param wait: seconds to wait for a running build to end,
        :param told: or, failing that, for its stop to be recorded (`stopping`).
        :param whole: wait for the groups it made besides its own to end too
            (a delete, which removes its workspace next).
        :returns: False if a running build has not ended within `wait`.
        """
        with self._lock:
            job = self._jobs.get(build_id)
            if job is None:
                # Not running here: it has not started, or something else runs it.
                if self.store.transition(build_id, "stopped", message,
                                         sources=WAITING) is None:
                    self.store.transition(build_id, "stopping", message, sources=("running",))
                return True
        job.stop("stopped", message)
        if (job.gone if whole else job.done).wait(wait):
            return True
        job.told.wait(told)
        return False

    def shutdown(self):
        """Stop running builds (they end `stopped`), then wait for the workers."""
        with self._cond:
            self._closing.set()
            self._cond.notify_all()
        with self._lock:  # no claim after this: _claim checks _closing under the lock
            jobs = list(self._jobs.values())
        for job in jobs:
            job.stop(*SHUT_DOWN)
        deadline = time.monotonic() + self.config.stop_grace + 5
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def stop_project(self, project_id, message, wait):
        """Stop whatever still runs of a project: after its rows are deleted, a
        build claimed while the delete waited would otherwise run on."""
        with self._lock:
            jobs = [job for job in self._jobs.values() if job.build["project_id"] == project_id]
        for job in jobs:
            job.stop("stopped", message)
        for job in jobs:
            job.gone.wait(wait)

    def recover(self):
        """End builds that a server which died left running, and kill what is
        left of them; and what is left inside their sessions of builds that had
        ended (a stop's grace that the crash cut short, say). Unless that server
        still runs: this is a copy of its data folder, and they are its.
        A restored backup's first start ends, besides, the builds that waited then."""
        me, namespace = os.getpid(), _pid_namespace()
        live = self._still_running(self.store.last_server(), me, namespace)
        left = self.store.managed_builds(STARTED)
        if not live:  # first, reading alone: a disk too full to write must not keep them running
            for row in left:
                _kill_leftovers(row["pgid"], row["pg_started"], row["uuid"])
            self.kill_groups_of_ended_builds()
        self.store.take_over(me, _running_since(me), namespace)
        taken_at = self.store.backup_taken()
        restored = (f"interrupted: the database was restored from a backup taken at {taken_at}, "
                    "while this build ran")
        for row in left:
            message = restored if taken_at is not None and row["created_at"] <= taken_at else \
                "interrupted: the server restarted while it ran"
            self.store.transition(row["id"], "failed", message)
            log.warning("%s failed: %s", self.store.label(row["id"]), message)
        if live:  # nor at any later start of this copy
            self.store.forget_processes()
        if taken_at is not None:
            self.store.end_restored(taken_at)
            log.warning("this database was restored from a backup taken at %s: the builds "
                        "that waited or ran then are ended, not run again", taken_at)

    def kill_groups_of_ended_builds(self, project_id=None, build_uuid=None):
        """Kill what is left inside the sessions of builds that had ended (of
        one project, or the build with `build_uuid`, if given): each start does, and
        each delete, whose rows would have told the next start where to look."""
        carried = _groups_by_build()
        if build_uuid is not None:
            carried = {build_uuid: carried[build_uuid]} if build_uuid in carried else {}
        sessions = self.store.sessions(carried, project_id) if carried else {}
        ended = {group for uuid, session in sessions.items()
                 for group, in_session in carried[uuid] if in_session == session}
        _kill_groups(ended)
        if ended:
            log.warning("killed %d process group(s) left by builds that had ended", len(ended))

    @staticmethod
    def _still_running(before, me, namespace):
        """Whether the server recorded `before` (not this process) still runs."""
        if before is None:
            return False
        pid, started, its_namespace = before
        # Another container's, say: no telling, nor killing (None: not recorded, 465c72c).
        if its_namespace is not None and its_namespace != namespace:
            log.warning("the server that last used this database ran in another pid namespace: "
                        "the processes of its builds are left alone")
            return True
        now_started = _running_since(pid)
        if pid == me or now_started is None or started is not None and now_started != started:
            return False  # gone (or a zombie), or its pid is another process's now
        log.warning("the server that last used this database (pid %d) still runs: this is a "
                    "copy of its data folder, and the processes of its builds are left to it", pid)
        return True

    def _work(self):
        if self.cores:  # its builds' commands inherit its cores
            os.sched_setaffinity(0, self.cores)
        while True:
            with self._cond:
                self._idle += 1
                while not (self._closing.is_set() or self._queue or self._handoffs):
                    self._cond.wait()
                self._idle -= 1
                item = self._next()
            if item is None:
                return
            if isinstance(item, _Handoff):  # a build being made running for an idle worker
                item.ready.wait()
                if item.error is not None:
                    self._could_not_start(item.build_id, item.error)
                job = item.job
            else:
                job = self._claim(item)
            if job is not None:
                self._attend(job)

    def _next(self):
        """What a worker takes next (under _cond): first a build made running
        for an idle worker, which must wait neither behind a claim put back in
        line nor for the next start; then, unless shutting down (queued builds
        stay scheduled), the queue's first."""
        if self._handoffs:
            return self._handoffs.popleft()
        return None if self._closing.is_set() else self._queue.popleft()

    def _claim(self, build_id):
        """Move a scheduled build to `running` and register its Job; None when
        it is not to run, or cannot start now."""
        try:
            with self._lock:
                if self._closing.is_set():
                    return None
                # Read with the move, in its transaction: nothing can change
                # the row between the two.
                with self.store.db.write():
                    if self.store.transition(build_id, "running", "started",
                                             sources=("scheduled",)) is None:
                        return None  # stopped or deleted while it waited
                    build = self.store.build(build_id)
                job = self._jobs[build_id] = Job(build)
                return job
        except Exception as e:  # e.g. a full disk, no file descriptors: the worker lives on
            self._could_not_start(build_id, e)
            return None

    def _could_not_start(self, build_id, error):
        """End a build that could not start: `failed`, if it was marked
        `running`; if its claim itself failed on the machine's fault (a full
        disk, say), it is still scheduled and goes back first in line."""
        label = self.store.label(build_id)
        if unavailable(error):
            log.error("%s could not start (%s)", label, error)
        else:
            log.exception("%s could not start", label, exc_info=error)
        try:  # (a stop may have come while no Job was registered: `stopping`)
            if self._persist(label, lambda: self.store.transition(
                    build_id, "failed", f"could not start: {error}",
                    sources=STARTED)):
                return
        except Exception:  # shutting down (the next start ends it), or a bug
            log.exception("%s: could not record that it could not start", label)
            return
        if unavailable(error):  # still scheduled: it stays first in line, tried again
            with self._cond:
                self._queue.appendleft(build_id)
                self._cond.notify()  # (an idle worker may try it; this one pauses)
            self._pause(1.0)
        # a bug leaves it scheduled until the next start

    def _attend(self, job):
        """Run a claimed build to its end, whatever happens."""
        try:
            self._run(job)
        except Exception as e:
            log.exception("%s: the runner failed", job.label)
            message = f"the database failed: {e}" if unavailable(e) else \
                "internal error in the runner"
            with contextlib.suppress(Exception):  # a restart's recovery ends it otherwise
                self._finish(job, "failed", message)
        finally:
            with self._lock:
                del self._jobs[job.id]
            job.close()
            job.told.set()
            job.done.set()
        try:
            if job.grace_ends is not None:
                self._end_escaped(job)
        except Exception:  # the worker lives on
            log.exception("%s: could not end the groups it made besides its own", job.label)
        finally:
            job.gone.set()

    def _end_escaped(self, job):
        """After a stop or timeout, end the process groups the build made
        besides its own (see _groups_escaped) that still run: SIGTERM, then
        SIGKILL when its grace ends, to them and to what they made meanwhile.
        After the build has ended, and a moment later: the search reads every
        process's status, and would hold up the stop's answer."""
        time.sleep(ESCAPED_SEARCH_DELAY)
        find = functools.partial(_groups_escaped, job.pgid, job.build["uuid"])
        ended, search_at = set(), 0.0
        while time.monotonic() < job.grace_ends:
            if time.monotonic() >= search_at:  # once a second: a live parent may make more
                fresh = find() - ended
                _terminate_older(fresh, job.signalled_tick)
                ended |= fresh
                search_at = time.monotonic() + 1.0
            if not any(map(_group_alive, ended)):
                break
            time.sleep(0.05)
        for _ in range(10):  # until a search finds none: a killed parent makes no more
            groups = find()
            if not groups:
                break
            _kill_groups(groups)
            ended |= groups
        if ended:
            log.info("%s: ended %d process group(s) it had made besides its own",
                     job.label, len(ended))

    def _run(self, job):
        if self._closing.is_set():  # begun while it was claimed or made: it would race the stop
            job.stop(*SHUT_DOWN)
        if job.ending:  # stopped (a shutdown, say) before its command started: it never does
            self._finish(job, *job.ending)
            return
        build = job.build
        names = (build["owner"], build["project_name"], str(build["number"]))
        workspace = os.path.join(self.config.workspaces, *names)
        if not _within(self.config.workspaces, *names):
            self._finish(job, "failed", "could not start: a folder above its workspace is a "
                                        "link out of the data folder (made by a build?)")
            return
        read_fd = write_fd = None
        try:
            read_fd, write_fd = os.pipe()
            try:
                os.makedirs(workspace)
            except FileExistsError:  # left by a build of a deleted namesake: start fresh
                _remove_tree(workspace)
                os.makedirs(workspace)
            _grow_pipe(write_fd)
            proc = subprocess.Popen(
                ["/bin/sh", "-c", build["command"]], cwd=workspace, env=_build_env(build, workspace),
                stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                start_new_session=True, close_fds=True)
        except OSError as e:  # no such folder, no file descriptors left, ...
            if read_fd is not None:
                os.close(read_fd)
            where = f": {e.filename}" if e.filename and e.filename != "/bin/sh" else ""
            self._finish(job, "failed", f"could not start: {e.strerror or e}{where}")
            return
        finally:
            if write_fd is not None:
                os.close(write_fd)
        job.pgid, job.started_at = proc.pid, time.monotonic()
        emptied = False
        try:
            job.exit_fd = _exit_notifier(proc.pid, job)  # (closed with the job)
            self.store.set_pgid(job.id, proc.pid, _start_time(proc.pid))
            emptied = self._supervise(job, proc, read_fd, job.exit_fd)
        finally:
            os.close(read_fd)
            if not emptied:
                _killpg(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        if returncode == 0:
            status, message = "succeeded", "exit code 0"
        elif returncode < 0:
            status, message = "failed", f"killed by signal {_signal_name(-returncode)}"
        else:
            status, message = "failed", f"exit code {returncode}"
        self._finish(job, status, message, exit_code=returncode)

    def _supervise(self, job, proc, out_fd, exit_fd):
        """Capture output, honour stop and timeout, and return once the shell
        has exited and its process group is gone (or the pipe has gone quiet):
        True if the shell is reaped and its group was seen empty."""
        poller = select.poll()
        poller.register(out_fd, select.POLLIN)
        poller.register(job.woken_fd, select.POLLIN)
        if exit_fd is not None:
            poller.register(exit_fd, select.POLLIN)
        view, filled, dropping, eof = None, 0, False, False
        flush_at = kill_at = drain_until = seek_at = members_at = members_wait = None
        timeout = job.build["timeout"]
        timeout_at = job.started_at + timeout if timeout else None  # (a slow commit counts)
        signalled = escaped_killed = emptied = False
        while not (eof and job.exited and kill_at is None):
            now = time.monotonic()
            deadlines = [t for t in (flush_at, kill_at, drain_until, seek_at, members_at,
                                     None if signalled or job.finishing else timeout_at)
                         if t is not None]
            wait_ms = max(0, int((min(deadlines) - now) * 1000) + 1) if deadlines else None
            for fd, _ in poller.poll(wait_ms):
                if fd == out_fd:
                    view = view or self._output_buffer()
                    # Before a read filled < LOG_CHUNK, so PIPE_SIZE bytes fit.
                    got = os.readv(out_fd, [view[filled:filled + PIPE_SIZE]])
                    if not got:
                        eof = True
                        poller.unregister(out_fd)
                    elif not dropping:
                        filled += got
                        flush_at = flush_at or now + LOG_FLUSH_SECONDS
                elif fd == exit_fd:
                    job.exited = True
                    poller.unregister(exit_fd)
                elif fd == job.member_fd:  # what was left of the group may all be gone
                    poller.unregister(fd)
                    job.unwatch_member()
                    # (Not once the grace is over: that look would come due for ever.)
                    if kill_at is not None:
                        members_at = now
                else:
                    os.read(job.woken_fd, 4096)
            now = time.monotonic()
            if timeout_at is not None and now >= timeout_at and not (signalled or job.finishing):
                job.stop("failed", f"timed out after {timeout} s")
            if job.ending and not signalled:
                _killpg(proc.pid, signal.SIGTERM)  # first: the group ends while we commit
                signalled = True
                kill_at = job.grace_ends = now + self.config.stop_grace
                # As of `now`, read before the SIGTERM: a group a cleanup makes
                # after it never reads as older, however late this thread ran again.
                job.signalled_tick = _boot_ticks(monotonic_at=now)
                seek_at = now + ESCAPED_SEARCH_DELAY  # unless the shell and its pipe end first
                self._persist(job.label, lambda: self.store.transition(
                    job.id, "stopping", job.ending[1]))
                job.stopping = True  # written: _finish need not write it
                job.told.set()
            if kill_at is not None and now >= kill_at:
                _killpg(proc.pid, signal.SIGKILL)
                kill_at = members_at = None
            if job.exited and kill_at is not None and now >= (members_at or now):
                # A stop's SIGTERM ended the shell at once, but dash runs a command
                # as its child: what is left in its group has the rest of the grace.
                left = _left_in_group(proc)
                if left == []:
                    kill_at = members_at = None
                    emptied = True
                else:  # woken when one ends; else looked at less often as it goes on
                    if left and job.member_fd is None and job.watch_member(left[0]) is not None:
                        poller.register(job.member_fd, select.POLLIN)
                    members_wait = min(1.0, 2 * members_wait) if members_at else MEMBERS_SECONDS
                    members_at = now + members_wait
            if job.exited and drain_until is None and kill_at is None:
                # The shell is gone: whatever it left in its group goes too. Its
                # exit decided how the build ends: a stop or timeout while the
                # last output drains comes too late.
                job.finish()
                if not emptied:  # (an emptied group's id may be another's by now)
                    _killpg(proc.pid, signal.SIGKILL)
                drain_until = now + DRAIN_SECONDS
                seek_at = now + ESCAPED_SEARCH_DELAY  # other groups may hold the pipe open
            if seek_at is not None and now >= seek_at:
                seek_at = None
                if not eof:  # (not at once: most builds' output ends within the delay)
                    escaped = _groups_escaped(proc.pid, job.build["uuid"])
                    if signalled and now < job.grace_ends:  # as its own group: the grace goes on
                        _terminate_older(escaped, job.signalled_tick)
                    else:  # an end is an end, and so is the end of a grace
                        _kill_groups(escaped)
            if drain_until is not None and now >= drain_until:
                escaped = _groups_escaped(proc.pid, job.build["uuid"]) \
                    if signalled and not escaped_killed else set()
                if escaped and now < job.grace_ends:
                    # A group it made still runs (with the pipe, most likely) and has
                    # the rest of the grace: the build is not over until it ends.
                    drain_until = min(job.grace_ends, now + DRAIN_SECONDS)  # (then again)
                elif escaped:
                    _kill_groups(escaped)
                    escaped_killed, drain_until = True, now + DRAIN_SECONDS
                else:
                    break  # something outside the build's groups holds the pipe open
            if filled and (filled >= LOG_CHUNK or eof or now >= flush_at):
                dropping = self._flush(job, view[:filled])
                filled, flush_at = 0, None
        if filled:
            self._flush(job, view[:filled])
        return emptied

    def _flush(self, job, data):
        """Store the buffered output; returns whether output is now being dropped."""
        result = self.store.append_log(job.id, data, self.config.max_log_bytes)
        if result is None:  # deleted while it ran
            job.stop("stopped", "the build was deleted")
        return result is None or result[1]

    def _finish(self, job, status, message, exit_code=None):
        """End the build: as a stop or timeout asked, else `status`."""
        ending = job.finish()
        if ending:
            if not job.stopping:  # asked after the supervisor last looked
                self._persist(job.label, lambda: self.store.transition(
                    job.id, "stopping", ending[1], sources=("running",)))
            status, message = ending
        self._persist(job.label, lambda: self.store.transition(
            job.id, status, message, exit_code=exit_code))
        log.info("%s %s: %s", job.label, status, message)

    def _persist(self, label, write):
        """Do `write` until the database takes it: a full disk, say, must not
        leave a build showing a status it has left. Gives up when the server
        shuts down (the next start's recovery ends the build)."""
        pause = 0.1
        while True:
            try:
                return write()
            except sqlite3.Error as e:
                if self._closing.is_set() or not unavailable(e):
                    raise
                log.error("%s: cannot record its status (%s); trying again", label, e)
                self._pause(pause)
                pause = min(2 * pause, 5.0)

    def _pause(self, seconds):
        """Sleep, but no longer than until shutdown (not on _cond: a notify
        there is for an idle worker)."""
        self._closing.wait(seconds)


# Where a deleted workspace waits for its removal (no user or project name starts with a dot).
SET_ASIDE = ".deleted-"


# Each workspaces folder's (device, inode) as its server started.
_WORKSPACES = {}


def _make_workspaces(path):
    """The workspaces folder, made if new. A link in its place is refused: a
    build may have made it (`mv workspaces x; ln -s /elsewhere workspaces`),
    and builds would run, and deletes remove, wherever it points."""
    if os.path.islink(path):
        raise UnsafeDataFolder(
            f"{path} is a link (to {os.readlink(path)}), not a folder: a build may have "
            "made it. Remove it (the server makes a new folder); to keep workspaces on "
            "another disk, move the whole data folder there")
    os.makedirs(path, exist_ok=True)


def _within(workspaces, *names):
    """Whether no folder above workspace `names` (under `workspaces`) is a
    link, nor `workspaces` another folder than at the start: a build may have
    made one (`ln -s /elsewhere ../../app`, or in `workspaces`' place), and
    what is made or removed there would be made or removed out of the data
    folder. (A look at each, not realpath's at every folder of the path: a
    build's start waits for it.)"""
    known = _WORKSPACES.get(workspaces)
    if known is not None and _file_identity(workspaces) != known:
        return False
    path = workspaces
    for name in names[:-1]:
        path = os.path.join(path, name)
        if os.path.islink(path):
            return False
    return True


def _set_aside(workspaces, *names):
    """Move the workspace folder at `names` (a project's, or a build's) out of
    the way of the namesake that may be made once its rows are deleted: the
    deleting request must never remove the namesake's. Returns where it went,
    or None if there was none (or it cannot move: a namesake's build wipes it)."""
    path = os.path.join(workspaces, *names)
    if not _within(workspaces, *names):
        log.warning("not removing the deleted workspace %s: a build made a link of a folder "
                    "above it, out of the data folder", path)
        return None
    aside = os.path.join(workspaces, SET_ASIDE + uuidlib.uuid4().hex)
    try:
        mode = os.lstat(path).st_mode  # a folder made read-only cannot move (its ".." changes)
        if stat.S_ISDIR(mode) and not mode & stat.S_IWUSR:
            os.chmod(path, stat.S_IMODE(mode) | stat.S_IWUSR)
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot set aside the deleted workspace %s (%s)", path, e.strerror or e)
        return None
    return aside


def _remove(folder):
    """Remove a deleted workspace, or say in the log why it stays."""
    try:
        _remove_tree(folder)
    except OSError as e:
        log.warning("cannot remove the deleted workspace %s (%s)", folder, e.strerror or e)


def _remove_tree(folder):
    """Remove `folder`, read-only folders in it too (Go makes its module
    cache read-only, and only root may delete in such a folder as it is).
    What is no folder goes as a file: a link (its target stays), or a FIFO a
    build made in the next build's place, which rmtree would open and wait on."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            os.unlink(folder)
            return
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except PermissionError:
        _let_owner_change(folder)
        shutil.rmtree(folder)


def _let_owner_change(folder):
    """Let the owner list and change `folder` and every folder in it, never
    through a link (one may lead out of it, or be swapped in meanwhile) nor
    into another file system mounted inside it."""
    device = os.lstat(folder).st_dev
    _owners_alone(folder)
    for _, names, _, fd in os.fwalk(folder):  # top down: a folder changes before it is read
        for name in list(names):
            try:
                if os.stat(name, dir_fd=fd, follow_symlinks=False).st_dev != device:
                    names.remove(name)
                    continue
            except OSError:
                continue
            _owners_alone(name, fd)


def _owners_alone(path, dir_fd=None):
    try:
        os.chmod(path, 0o700, dir_fd=dir_fd, follow_symlinks=False)
    except (NotImplementedError, ValueError):
        # A link, which Linux cannot change; or glibc before 2.32, which
        # cannot change anything without following links: a folder then.
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.chmod(path, 0o700, dir_fd=dir_fd)
    except OSError:  # not ours: rmtree then says so
        pass


def _remove_set_aside(workspaces):
    """Remove the workspaces that deletes set aside before a server stopped."""
    try:
        names = os.listdir(workspaces)
    except OSError:  # (in the background: the data folder may be gone meanwhile)
        return
    for name in names:
        if name.startswith(SET_ASIDE):
            _remove(os.path.join(workspaces, name))


def _in_background(function, *args):
    """Run `function` in a thread of its own: removing a project's workspaces
    (100 000 builds' folders) takes tens of seconds, which a request, or a
    start, would wait for. What a crash cuts short, the next start removes."""
    threading.Thread(target=function, args=args, name=function.__name__, daemon=True).start()


def _build_env(build, workspace):
    """The server's environment but for its own settings (BUILDSERVER_*: a
    token exported for the client would reach every user's builds, and a
    build that runs a buildserver would get this one's data folder), then
    the project's and build's env, then BUILD_VARIABLES."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("BUILDSERVER_")}
    env.update(json.loads(build["env"]))
    env.update(zip(BUILD_VARIABLES, (
        str(build["number"]), build["uuid"], f"{build['owner']}/{build['project_name']}",
        build["user"], workspace)))
    return env


def _grow_pipe(fd):
    """Fewer wake-ups per megabyte of output (Linux only; harmless elsewhere)."""
    try:
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except (ImportError, OSError):
        pass


def _exit_notifier(pid, job):
    """A file descriptor that turns readable when process `pid` exits (a Linux
    pidfd), or None after starting a thread that wakes the job instead. Neither
    reaps the process: until it is reaped its pid, which is also its group's
    id, cannot be reused, so killpg stays safe. (A stop reaps it to see its
    group empty: from then on the id is the group's while a member lives,
    and a SIGKILL to a group seen alive a moment before could only reach
    another's if the pids wrapped around meanwhile.)"""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        threading.Thread(target=_watch_exit, args=(pid, job), name=f"exit-{pid}",
                         daemon=True).start()
        return None


def _watch_exit(pid, job):
    """Tell the job when its shell exits, without reaping it."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass
    job.exited = True
    job.wake()


def _alive(pid, kill=os.kill):
    """Whether process `pid` exists (with kill=os.killpg: process group), ours or not."""
    try:
        kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        pass
    return True


def _group_alive(pgid):
    """Whether process group `pgid` has a member: a zombie counts, so the
    server first reaps those of its own (see _adopt_orphans)."""
    _reap_adopted()
    return _alive(pgid, kill=os.killpg)


PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>

# The list of the orphans the server adopted (its main thread's children), once
# _adopt_orphans made it their reaper; only _reap_adopted reaps them, under the lock.
_adopted = None
_adopted_lock = threading.Lock()


def _adopt_orphans():
    """Have the kernel give this server, not the first process, what its
    builds leave orphaned (Linux: a child subreaper), to reap it the moment
    it ends. A first process may take seconds to (this VM's takes 2 s), or
    never, and till then an ended member of a stopped build's group kept the
    group there: each stop read every process's status to tell it held only
    zombies. Only from the main thread, which starts no process: its
    children are then all adopted, none a shell a worker waits for. Not
    where the kernel cannot list them (no /proc/PID/task/TID/children):
    nothing would reap them; nor under a /proc of another pid namespace
    (`unshare --pid` without `--mount-proc`), whose numbers are not ours:
    what it lists might be our shells."""
    global _adopted
    children = f"/proc/{os.getpid()}/task/{threading.get_native_id()}/children"
    try:
        ours = os.readlink("/proc/self") == str(os.getpid()) and os.path.exists(children)
    except OSError:  # no /proc
        ours = False
    if not ours or threading.current_thread() is not threading.main_thread():
        return
    try:
        import ctypes
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return
    except (ImportError, OSError, AttributeError):  # no ctypes, or no prctl
        return
    _adopted = children


def _reap_adopted():
    """Reap what has ended of the orphans the server adopted. (A pid listed
    stays its zombie's till reaped here, under the lock: it cannot be
    another's by then.)"""
    if _adopted is None:
        return
    with _adopted_lock:
        for pid in _read(_adopted).split():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(pid), os.WNOHANG)


def _boot_ticks(monotonic_at=None):
    """Now, or when time.monotonic() read `monotonic_at` (a moment ago), in
    clock ticks since boot: what /proc says a process started at. None where
    there is no such clock (macOS: no /proc either)."""
    if not hasattr(time, "CLOCK_BOOTTIME"):
        return None
    seconds = time.clock_gettime(time.CLOCK_BOOTTIME)
    if monotonic_at is not None:
        seconds -= time.monotonic() - monotonic_at
    return int(seconds * os.sysconf("SC_CLK_TCK"))


def _terminate_older(groups, tick):
    """SIGTERM the process groups whose leader started before `tick` (as of
    just before a stop's SIGTERM, in clock ticks since boot; one whose leader
    is gone counts as older, and all do if `tick` is None). Those made since,
    by a cleanup (`timeout 60 upload`), had no SIGTERM coming: the grace's
    end kills them with the rest, as it does one made in that tick before
    the SIGTERM (/proc counts in ticks)."""
    for group in groups:
        started = _start_time(group)
        if started is None or tick is None or int(started) < tick:
            _killpg(group, signal.SIGTERM)


def _left_in_group(proc):
    """The pids of what lives on in the process group that `proc`, which
    has exited, led: [] if nothing, None if something does but there is no
    telling what (not Linux). `proc` is reaped first: its zombie counted as
    a member. (A group's id stays its own only while a member does.) Members
    that have ended may wait for init to reap them, where the server did not
    adopt them, seconds in some containers: those count as gone (Linux;
    elsewhere until reaped)."""
    proc.poll()
    if not _group_alive(proc.pid):
        return []
    if not os.path.isdir("/proc/self"):
        return None
    # An orphan the server adopted is most likely what is left (a stop's
    # SIGTERM reached it as it did the shell): found, no need to read every
    # process's status. Only reading them all shows there is none.
    return _adopted_members(proc.pid) or [int(pid) for pid in _group_members(proc.pid)]


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_groups(groups):
    for group in groups:
        _killpg(group, signal.SIGKILL)


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _kill_leftovers(pgid, started, build_uuid):
    """Kill a dead server's build's process group, if it still is that build's.

    A pid (and so a group id) may have been reused since. On Linux the group is
    the build's if its leader is the build's shell (same start time: `exec`
    keeps it), or, with the leader gone or its start time never recorded (a
    database from before migration 2), if a member carries its BUILD_UUID.
    Elsewhere (macOS) it is the build's if `ps` dates its leader as the
    build's shell, to the second; when it cannot tell, the group is left
    alone: after a power loss it may be anyone's. Whatever else
    carries its BUILD_UUID goes too, with its group (Linux): what left the
    group (`setsid`, a daemon), or all of it if the group was never recorded
    (the server died just after starting it).
    """
    if pgid and pgid != os.getpgrp() and _is_the_builds(pgid, started, build_uuid):
        _killpg(pgid, signal.SIGKILL)
    _kill_groups(_groups_carrying(build_uuid))


def _is_the_builds(pgid, started, build_uuid):
    """Whether process group `pgid` is still the build's (see _kill_leftovers)."""
    leader = _start_time(pgid)
    if leader is not None and started:
        return leader == started
    if not os.path.isdir("/proc/self"):
        return False
    return any(_carries(pid, build_uuid) for pid in _group_members(pgid))


def _carries(pid, build_uuid):
    """Whether process `pid`'s environment holds the build's BUILD_UUID."""
    return f"\0BUILD_UUID={build_uuid}\0".encode() in b"\0" + _environ(pid) + b"\0"


def _environ(pid):
    """Process `pid`'s environment (Linux /proc): a thread's when its main
    thread has ended, which can no longer be read from."""
    environ = _read(f"/proc/{pid}/environ")
    if not environ and _stat(pid)[:1] == [b"Z"]:
        with contextlib.suppress(OSError):
            for thread in os.listdir(f"/proc/{pid}/task"):
                if environ := _read(f"/proc/{pid}/task/{thread}/environ"):
                    break
    return environ


def _groups_carrying(build_uuid):
    """The process groups (not ours) of the processes that carry the build's
    BUILD_UUID (Linux; elsewhere none)."""
    return {group for group, _ in _groups_by_build().get(build_uuid, ())}


def _groups_by_build():
    """{BUILD_UUID: {(process group, session)}} of the processes (not ours)
    that carry one (Linux; elsewhere none)."""
    found = collections.defaultdict(set)
    if os.path.isdir("/proc/self"):
        ours = os.getpgrp()
        for pid, group, session in _processes():
            if group in (0, ours):  # 0: the kernel's threads
                continue
            uuids = [entry[11:] for entry in _environ(pid).split(b"\0")
                     if entry.startswith(b"BUILD_UUID=")]
            if uuids:
                found[uuids[0].decode("ascii", "replace")].add((group, session))
    return found


def _groups_escaped(session, build_uuid):
    """The process groups that the build whose shell led `session` made
    inside it, besides its own (`timeout`, a shell's job control), of
    processes that carry its BUILD_UUID (Linux; elsewhere none)."""
    if not os.path.isdir("/proc/self"):
        return set()
    return {group for pid, group, in_session in _processes()
            if in_session == session != group and _carries(pid, build_uuid)}


def _stat(pid):
    """The fields of /proc/<pid>/stat after the command name (state first), or []."""
    line = _read(f"/proc/{pid}/stat")
    return line[line.rfind(b")") + 2:].split()


def _start_time(pid):
    """When process `pid` started: in clock ticks since boot (Linux), else as
    `ps` says (macOS); None if it is gone, or there is no telling."""
    if not os.path.isdir("/proc/self"):
        return _ps_start_time(pid)
    fields = _stat(pid)
    return fields[19].decode() if len(fields) > 19 else None


def _running_since(pid):
    """When process `pid` started, if it runs (a zombie has ended); else None."""
    return None if _stat(pid)[:1] in ([b"Z"], [b"X"]) else _start_time(pid)


def _pid_namespace():
    """Which pid namespace this process is in (Linux), or None."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _ps_start_time(pid):
    """When process `pid` started, to the second, as `ps` says; or None."""
    try:
        said = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True,
                              env={**os.environ, "LC_ALL": "C"}, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return said.stdout.decode("ascii", "replace").strip() or None


def _group_members(pgid):
    return (pid for pid, group, _ in _processes() if group == pgid)


def _processes(pids=None):
    """(pid, process group, session) of every live process (Linux /proc), or
    of those of `pids` that live: not those that ended, waiting to be
    reaped. (A process whose main thread ended reads as ended, "Z", while
    its other threads run on.)"""
    for pid in filter(str.isdigit, os.listdir("/proc")) if pids is None else pids:
        fields = _stat(pid)
        if len(fields) > 17 and (fields[0] not in (b"Z", b"X") or int(fields[17]) > 1):
            yield pid, int(fields[2]), int(fields[3])


def _adopted_members(pgid, newest=8):
    """The pids of the orphans the server adopted last (the kernel lists them
    in that order) that live on in group `pgid`: what a shell that just
    ended left. Not all of them: 200 daemons the builds left would take
    2 ms to look at."""
    if _adopted is None:
        return []
    last = _read(_adopted).decode().split()[-newest:]
    return [int(pid) for pid, group, _ in _processes(last) if group == pgid]


def _read(path):
    """The bytes of a file, b"" if it cannot be read. (Without a file
    object: a look through /proc reads a hundred small files.)"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        chunks = []
        while chunk := os.read(fd, 64 * KiB):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return b""
    finally:
        os.close(fd)


###############################################################################
# HTTP helpers ################################################################
###############################################################################

def json_bytes(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def body_limit(path):
    """The largest request body a path takes."""
    return LOG_BODY_LIMIT if path.rstrip("/").endswith("/logs") else JSON_BODY_LIMIT


def _url_host(host):
    return f"[{host}]" if ":" in host else host


def read_body(limit):
    """The request body. One whose Content-Length passes its path's limit never
    gets here (see _refused_before_routing; under waitress it is not even
    received); one sent without a length is refused once read past `limit`."""
    environ = bottle.request.environ
    length = environ.get("CONTENT_LENGTH") or ""
    size = content_length(length)
    if length and size is None:
        raise ApiError(400, "The Content-Length header is not a number.")
    body = environ["wsgi.input"].read(limit + 1 if size is None else min(size, limit + 1))
    if len(body) > limit:
        raise ApiError(413, too_large(limit))
    codings = [c.strip() for c in environ.get("HTTP_CONTENT_ENCODING", "").lower().split(",")]
    if body and set(codings) - {"", "identity"}:  # (it was parsed, or stored, compressed)
        raise ApiError(415, "The request body must be sent uncompressed, not with "
                            f"Content-Encoding {environ['HTTP_CONTENT_ENCODING'][:40]!r}.")
    return body


def too_large(limit):
    return f"The request body is larger than the limit of {limit} bytes."


JSON_SPACE = b" \t\r\n"  # (bytes.strip() takes \x0b and \x0c too, which JSON does not)


def read_json(empty_ok=False):
    """The body as a JSON object."""
    body = read_body(JSON_BODY_LIMIT)
    if not body.strip(JSON_SPACE) and empty_ok:
        return {}
    try:  # (json.loads would take UTF-16 and UTF-32 bytes too)
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not UTF-8 text.") from None
    try:
        data = json.loads(text, object_pairs_hook=_object_once)
    except _KeyGivenTwice as e:
        raise ApiError(400, f"The request body gives the key {e.key!r} more than once.") from None
    except (json.JSONDecodeError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON.") from None
    except ValueError:  # Python's limit on the digits of an int (4300)
        raise ApiError(400, "The request body holds a number with more digits than "
                            "any field takes.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:  # a lone surrogate ("\ud800") anywhere, field names included, is not text
        json_bytes(data)
    except UnicodeEncodeError:
        raise ApiError(400, LONE_SURROGATE) from None
    except RecursionError:  # the decoder nests deeper than the encoder can
        raise ApiError(400, "The request body nests objects and arrays too deeply.") from None
    return data


def refuse_body():
    """For a route that takes no body: one sent there (a restart's `command`,
    say) would be silently ignored, so anything but nothing, `{}` or `null`
    gets 400."""
    body = read_body(JSON_BODY_LIMIT)
    if body.strip(JSON_SPACE):
        try:
            empty = json.loads(body) in ({}, None)
        except (ValueError, RecursionError):
            empty = False
        if not empty:
            raise ApiError(400, f"{bottle.request.method} {bottle.request.path} takes no "
                                "request body; send none.")


class _KeyGivenTwice(Exception):
    def __init__(self, key):
        self.key = key


def _object_once(pairs):
    """A JSON object whose keys are all different: like a query parameter
    given twice, a key given twice is ambiguous (json would keep the last)."""
    data = dict(pairs)
    if len(data) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _KeyGivenTwice(key)
            seen.add(key)
    return data


def query_param(name):
    """The query parameter's one value, or None; given twice it is ambiguous."""
    values = bottle.request.query.getall(name)
    if len(values) > 1:
        raise ApiError(400, f"The query parameter {name} is given more than once.",
                       errors={name: "given more than once"})
    if not values:
        return None
    try:  # Bottle gives the %-decoded bytes as Latin-1 (as WSGI does)
        return values[0].encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, f"The query parameter {name} is not valid UTF-8.",
                       errors={name: "is not valid UTF-8"}) from None


def int_param(name, default, low, high):
    raw = query_param(name)
    if raw is None or raw == "":
        return default
    value = whole_number(raw, 19)
    if value is None or not low <= value <= high:
        reason = f"must be a whole number from {low} to {high}"
        raise ApiError(400, f"The query parameter {name} {reason}.", errors={name: reason})
    return value


def flag_param(name):
    raw = (query_param(name) or "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ApiError(400, f"The query parameter {name} must be 1 or 0 (or true or false, yes or no).",
                   errors={name: "must be 1 or 0"})


def prefers_json(accept):
    """Whether an Accept header asks for application/json (named, in any case)
    at least as much as for text/plain: `*/*` alone keeps the default, text."""
    quality = {}
    for item in accept.split(","):
        media, *params = [part.strip() for part in item.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(q, quality.get(media.lower(), 0.0))
    json_q = quality.get("application/json", 0.0)
    text_q = next((quality[m] for m in ("text/plain", "text/*", "*/*") if m in quality), 0.0)
    return json_q > 0 and json_q >= text_q


def page_params():
    return int_param("limit", 20, 1, PAGE_MAX), int_param("offset", 0, 0, 2 ** 62)


# A host name or an address in brackets, and a port: what a Host header may say.
HOST_RE = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _link_host(request):
    """The host a page's links name: the request's (its proxy's), unless its
    Host header is no host, when the server's own address is: a script that
    follows `next` sends its token there ("a b@evil.example/x?" would)."""
    if HOST_RE.fullmatch(request.urlparts.netloc):
        return request.urlparts.netloc
    return f"{_url_host(request.environ['SERVER_NAME'])}:{request.environ['SERVER_PORT']}"


def page(count, results, limit, offset):
    """A page of a list, with links to its neighbours."""
    def link(new_offset):
        request = bottle.request
        # The parameters' own bytes (Bottle gives them as Latin-1), whatever they are.
        # Each in its place, repeated ones too; limit and offset once each.
        pending = {b"limit": str(limit).encode(), b"offset": str(new_offset).encode()}
        query = []
        for name, value in request.query.allitems():
            name = name.encode("latin-1")
            if name not in (b"limit", b"offset"):
                query.append((name, value.encode("latin-1")))
            elif name in pending:
                query.append((name, pending.pop(name)))
        query += pending.items()
        path = request.environ.get("buildserver.path", request.path)
        return f"{request.urlparts.scheme}://{_link_host(request)}{path}?" + \
            urllib.parse.urlencode(query)
    return {"count": count,
            "next": link(offset + limit) if offset + limit < count else None,
            "previous": link(max(0, offset - limit)) if offset > 0 else None,
            "results": results}


###############################################################################
# Representations #############################################################
###############################################################################

def project_json(p):
    return {"name": p["name"], "owner": p["owner"], "description": p["description"],
            "command": p["command"], "env": json.loads(p["env"]), "timeout": p["timeout"],
            "created_at": p["created_at"], "updated_at": p["updated_at"],
            "builds_count": p["builds_count"],
            "last_build": None if p["last_number"] is None else
            {"id": p["last_number"], "last_status": p["last_status"]}}


def build_label(b):
    """A build as people know it, for the server's log: "build 7 of alice/app"."""
    return f"build {b['number']} of {b['owner']}/{b['project_name']}"


def build_json(b):
    duration = None
    if b["started_at"]:
        end = parse_iso(b["finished_at"]) if b["finished_at"] else \
            datetime.datetime.now(datetime.timezone.utc)
        duration = round((end - parse_iso(b["started_at"])).total_seconds(), 3)
    owner, project = b["owner"], b["project_name"]
    return {
        "id": b["number"], "uuid": b["uuid"], "name": b["name"],
        "unique_name": f"{owner}.{project}.builds.{b['number']}", "user": b["user"],
        "project": f"{owner}/{project}", "description": b["description"],
        "tags": json.loads(b["tags"]), "last_status": b["last_status"],
        "is_managed": bool(b["is_managed"]), "created_at": b["created_at"],
        "updated_at": b["updated_at"], "started_at": b["started_at"],
        "finished_at": b["finished_at"], "command": b["command"], "env": json.loads(b["env"]),
        "timeout": b["timeout"], "exit_code": b["exit_code"], "duration": duration,
        "log_size": b["log_size"], "truncated": bool(b["truncated"]),
        "restarted_from": b["restarted_from"], "bookmarked": bool(b["bookmarked"])}


class JSONBytes(bytes):
    """An answer already encoded as JSON."""


def build_body(b):
    """build_json(b), encoded. A build that is not running answers the same
    until its row changes: that answer is kept, so a script polling it is
    answered without building the answer again."""
    if (b["started_at"] and not b["finished_at"]) or row_bytes(b) > Database.RECENT_ROW_BYTES:
        return _encoded_build(b)  # its duration grows, or it is big
    return _settled_build_body(b)


def _encoded_build(b):
    return JSONBytes(json_bytes(build_json(b)))


# Keyed by the row's values: a changed row is another key.
_settled_build_body = functools.lru_cache(maxsize=32)(_encoded_build)


def status_json(entry, build_number):
    return {"id": entry["number"], "uuid": entry["uuid"], "job": build_number,
            "status": entry["status"], "message": entry["message"],
            "created_at": entry["created_at"]}


###############################################################################
# OpenAPI #####################################################################
###############################################################################
# The document is generated from the routing table and from FIELDS, the rules
# the server validates with, so it cannot drift from what the server does.

Route = collections.namedtuple("Route", "method path handler body query answer",
                               defaults=(None, (), (200, "Detail")))

_USER = {"type": "string", "description": "a user name, " + FIELDS["project_name"]["description"]}
_ID = {"type": "string", "pattern": "^[0-9]+$", "description": "a build's id (a whole number)"}
PATH_PARAMS = {
    "username": _USER, "project_name": FIELDS["project_name"], "build_id": _ID,
    "status_id": {"type": "string", "description": "a status entry's number, or its uuid"},
}
PAGE_QUERY = (("limit", {"type": "integer", "minimum": 1, "maximum": PAGE_MAX, "default": 20}),
              ("offset", {"type": "integer", "minimum": 0, "maximum": 2 ** 62, "default": 0}))
BUILDS_QUERY = PAGE_QUERY + (("status", {
    "type": "string", "pattern": "^(%s)?(,(%s)?)*$" % (("|".join(STATUSES),) * 2),
    "description": "only builds whose last_status is one of these, comma-separated"}),)
LOG_QUERY = (
    ("offset", {"type": "integer", "minimum": 0, "maximum": 2 ** 62,
                "description": "the first byte to send"}),
    ("limit", {"type": "integer", "minimum": 1, "maximum": 2 ** 62,
               "description": "at most this many bytes (JSON: default 1 MiB, at most 4 MiB)"}),
    ("tail", {"type": "integer", "minimum": 0, "maximum": 10 ** 7,
              "description": "send the last N lines (but nothing before offset)"}),
    ("follow", {"type": "string", "enum": ["0", "1", "true", "false", "yes", "no"],
                "description": "text only: keep sending new output until the build is final"}),
    ("format", {"type": "string", "enum": ["text", "json"],
                "description": "text (the default) or json (also chosen by Accept: application/json)"}),
)


def _object(properties, required=None):
    return {"type": "object", "properties": properties,
            "required": sorted(properties) if required is None else list(required),
            "additionalProperties": False}


_STRING, _INT, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_TIME = {"type": "string", "format": "date-time"}
_NULL_STRING, _NULL_INT = {"type": ["string", "null"]}, {"type": ["integer", "null"]}
_NULL_TIME = {"type": ["string", "null"], "format": "date-time"}
_ENV = {"type": "object", "additionalProperties": {"type": "string"}}
_STATUS = {"type": "string", "enum": list(STATUSES)}
SCHEMAS = {
    "Detail": _object({"detail": _STRING}),
    "Error": _object({"detail": _STRING, "errors": {
        "type": "object", "additionalProperties": {"type": "string"}}}, required=["detail"]),
    "Health": _object({"status": {"type": "string", "enum": ["ok"]}}),
    "User": _object({"username": _STRING, "is_admin": _BOOL, "email": {"type": "null"},
                     "is_superuser": _BOOL}),
    "Project": _object({
        "name": _STRING, "owner": _STRING, "description": _NULL_STRING,
        "command": _NULL_STRING, "env": _ENV, "timeout": _NULL_INT, "created_at": _TIME,
        "updated_at": _TIME, "builds_count": _INT,
        "last_build": {"oneOf": [{"type": "null"},
                                 _object({"id": _INT, "last_status": _STATUS})]}}),
    "Build": _object({
        "id": _INT, "uuid": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "name": _NULL_STRING, "unique_name": _STRING, "user": _STRING, "project": _STRING,
        "description": _NULL_STRING, "tags": {"type": "array", "items": _STRING},
        "last_status": _STATUS, "is_managed": _BOOL, "created_at": _TIME, "updated_at": _TIME,
        "started_at": _NULL_TIME, "finished_at": _NULL_TIME, "command": _NULL_STRING,
        "env": _ENV, "timeout": _NULL_INT, "exit_code": _NULL_INT,
        "duration": {"type": ["number", "null"]}, "log_size": _INT, "truncated": _BOOL,
        "restarted_from": _NULL_INT, "bookmarked": _BOOL}),
    "Status": _object({
        "id": _INT, "uuid": {"type": "string", "pattern": "^[0-9a-f]{32}$"}, "job": _INT,
        "status": _STATUS, "message": _NULL_STRING, "created_at": _TIME}),
    "LogPage": _object({
        "job": _INT, "offset": _INT, "next_offset": _INT, "size": _INT, "complete": _BOOL,
        "truncated": _BOOL, "text": _STRING}),
    "LogSize": _object({"size": _INT}),
    "CodeReference": _object({name: {"type": field["type"]}
                              for name, field in CODE_REFERENCE.items()}),
    "Bookmark": _object({"content_object": {"$ref": "#/components/schemas/Build"}}),
}
for _name in ("Project", "Build", "Status", "Bookmark"):
    SCHEMAS[_name + "Page"] = _object({
        "count": _INT, "next": _NULL_STRING, "previous": _NULL_STRING,
        "results": {"type": "array", "items": {"$ref": f"#/components/schemas/{_name}"}}})

ERROR_ANSWERS = {
    "400": "invalid JSON, fields or query parameters", "401": "no token, or not a valid one",
    "403": "outside your namespace", "404": "no such user, project, build or status",
    "405": "method not allowed", "409": "the project is being deleted",
    "413": "the body is over the limit",
    "415": "a compressed body (Content-Encoding)",
    "429": "too many failed authentications from this address",
    "431": "the request's headers are too large",
    "500": "internal error", "501": "a Transfer-Encoding other than chunked",
    "503": "the server is shutting down, or too many log followers",
}


def openapi_document(routes):
    """OpenAPI 3.1 for `routes` (a list of Route)."""
    paths = {}
    for route in routes:
        path = re.sub(r"<(\w+)>", r"{\1}", route.path)
        summary, _, details = (route.handler.__doc__ or route.handler.__name__).strip().partition("\n")
        code, schema = route.answer
        operation = {
            "operationId": f"{route.handler.__name__}_{route.method.lower()}"
                           + ("_stop" if path.endswith("/stop") else ""),
            "summary": summary.strip(), "description": " ".join(details.split()),
            "parameters": [{"name": name, "in": "path", "required": True, "schema": PATH_PARAMS[name]}
                           for name in re.findall(r"{(\w+)}", path)]
            + [{"name": name, "in": "query", "required": False, "allowEmptyValue": True,
                "schema": schema_} for name, schema_ in route.query],
            "responses": {str(code): {"description": "success", "content": _answer_content(schema)},
                          **{c: {"description": d, "content": {"application/json": {
                              "schema": {"$ref": "#/components/schemas/Error"}}}}
                             for c, d in ERROR_ANSWERS.items()}},
        }
        if getattr(route.handler, "needs_token", False):
            operation["security"] = [{"token": []}]
        if route.body == "log":
            operation["requestBody"] = {"content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {
                    "description": "a string appends its text, a list of strings its lines; "
                                   "anything else is appended as it is"}}}}
        elif route.body is not None:
            fields, required = route.body
            operation["requestBody"] = {"required": bool(required), "content": {
                "application/json": {"schema": _object(fields, required)}}}
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "buildserver", "version": __version__,
                 "description": "Polyaxon v0.x's build-jobs API, served by buildserver. Every "
                                "path also answers with a trailing slash."},
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": {"token": {
            "type": "apiKey", "in": "header", "name": "Authorization",
            "description": "Token <token> (or Bearer <token>)"}}},
    }


def _answer_content(schema):
    if schema == "LogText":
        return {"text/plain": {"schema": {"type": "string"}},
                "application/json": {"schema": {"$ref": "#/components/schemas/LogPage"}}}
    if schema == "HTML":
        return {"text/html": {"schema": {"type": "string"}}}
    if schema == "OpenAPI":
        return {"application/json": {"schema": {"type": "object"}}}
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


###############################################################################
# The application #############################################################
###############################################################################

class App:
    """The WSGI application: routes, auth, the runner and the database.

    It serves every route with and without a trailing slash (by trimming the
    slash before Bottle routes: a redirect would turn a client's POST into a
    GET), and logs one line per request, never a token.
    """

    def __init__(self, config):
        self.config = config
        _make_private_dir(config.data_dir)
        _make_workspaces(config.workspaces)
        _WORKSPACES[config.workspaces] = _file_identity(config.workspaces)
        _in_background(_remove_set_aside, config.workspaces)
        self.db = Database(config.db_path, background_checkpoints=True)
        self.db.migrate()
        self.bus = LogBus()
        self.store = Store(self.db, on_change=self.bus.notify)
        self.runner = Runner(config, self.store)
        # Requests that hold an HTTP thread while they wait on builds (log
        # followers, stops and deletes of running builds): a reserve of the
        # threads is always left for the rest of the API.
        self.wait_slots = threading.BoundedSemaphore(config.max_waiting)
        self.throttle = AuthThrottle(config.auth_burst)
        self.closing = False
        self.waited_on = False  # (see shutdown)
        self.deleting = collections.Counter()  # project id: deletes of it under way
        self._deleting_lock = threading.Lock()
        self.bottle = make_routes(self)

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        environ["buildserver.path"] = path
        if len(path) > 1 and path.endswith("/"):
            environ["PATH_INFO"] = path.rstrip("/") or "/"
        started = time.perf_counter()
        answered = []

        def start(status, headers, exc_info=None):
            answered.append(status[:3])
            write = start_response(status, headers, exc_info)
            environ["buildserver.write"] = write
            return write

        def log_request():
            # repr() escapes newlines and the like: a path cannot forge a log line
            log.info("%s %s %s %.1fms %s", environ.get("REQUEST_METHOD"), repr(path)[1:-1],
                     answered[0] if answered else "-", (time.perf_counter() - started) * 1000,
                     environ.get("buildserver.user", "-"))

        try:
            refused = _refused_before_routing(environ, path)
            body = self.bottle(environ, start) if refused is None else _answer(start, *refused)
        except BaseException:
            log_request()
            raise
        if isinstance(body, list):  # logged once sent: the client does not wait for the line
            return _Then(body, log_request)
        log_request()  # a log or a file: logged as it starts
        return body

    def shutdown(self, timeout=None):
        """Refuse writes and waits, stop the builds (followers get their last
        output), then end the followers; True if they all ended in `timeout`.
        Sets `waited_on`: whether requests were waiting on builds."""
        self.closing = True
        # Holding every slot (none is left for another): those free before
        # the builds stop first, which tells whether any request waited.
        free = sum(self.wait_slots.acquire(blocking=False) for _ in range(self.config.max_waiting))
        self.waited_on = free < self.config.max_waiting
        self.runner.shutdown()
        self.bus.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in range(self.config.max_waiting - free):
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.wait_slots.acquire(timeout=remaining):
                return False
        return True

    @contextlib.contextmanager
    def deleting_project(self, project_id):
        """While a delete of the project runs, no build starts in it (see
        start_build); a second delete's end does not end the first's."""
        with self._deleting_lock:
            self.deleting[project_id] += 1
        try:
            yield
        finally:
            with self._deleting_lock:
                self.deleting[project_id] -= 1
                if not self.deleting[project_id]:
                    del self.deleting[project_id]

    def close(self):
        """Shut down and close the database (after the HTTP threads are done)."""
        if not self.closing:
            self.shutdown(timeout=SHUTDOWN_SECONDS)
        self.db.close()


def _is_utf8(path):
    """Whether a WSGI path (its bytes as latin-1) is UTF-8. Bottle would drop
    the bytes that are not, and a request for "vic%FFtim" reach "victim"."""
    try:
        path.encode("latin-1").decode("utf-8")
        return True
    except UnicodeError:
        return False


def _refused_before_routing(environ, path):
    """(status, sentence) for a request no route may see, or None: a path
    that is not UTF-8 or has an encoded slash, or a body over its path's
    limit. The parser left that body unread (see _channel_class), and a route
    that takes no body, a delete or a stop, must not act on the request
    either."""
    if not _is_utf8(path):
        return 400, "The path is not valid UTF-8 once its %-escapes are decoded."
    # The server decodes %2F before routing: /alice/app%2Fbuilds would reach
    # /alice/app/builds. No name holds a slash, so such a path is a mistake.
    raw_path = (environ.get("REQUEST_URI") or environ.get("RAW_URI") or "").partition("?")[0]
    if "%2f" in raw_path.lower():
        return 400, "The path holds an encoded slash (%2F); no name has one."
    length, limit = content_length(environ.get("CONTENT_LENGTH")), body_limit(path)
    if length is not None and length > limit:
        return 413, too_large(limit)
    return None


def _answer(start_response, status, detail):
    body = json_bytes({"detail": detail})
    start_response(f"{status} {bottle.HTTP_CODES[status]}", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
        ("X-Content-Type-Options", "nosniff")])
    return [body]


class _Then(list):
    """A response body that calls `then` when the server is done sending it
    (WSGI servers call a body's close())."""

    def __init__(self, body, then):
        super().__init__(body)
        self._then = then

    def close(self):
        self._then()


def make_app(config=None, start=True):
    """The buildserver WSGI app for `config` (a Config, or a mapping of its fields).

    :param start: start the runner (recovery, then the workers) at once.
    """
    if not isinstance(config, Config):
        config = Config(**(config or {}))
    app = App(config)
    if start:
        app.runner.start()
    return app


# Lookups that own their 404s ------------------------------------------------------

def _owner(app, username):
    user = app.store.user_by_name(username) if valid_name(username) else None
    if user is None:
        raise ApiError(404, f"There is no user {username!r}.")
    return user


def _project(app, username, project_name):
    project = app.store.project(username, project_name) if valid_name(project_name) else None
    if project is None:
        _owner(app, username)
        raise ApiError(404, f"There is no project {username}/{project_name}.")
    return project


def _build(app, username, project_name, build_id):
    """The build; 404 for ids that are not whole numbers."""
    number = whole_number(build_id)
    build = None if number is None or not valid_name(project_name) else \
        app.store.build_at(username, project_name, number)
    if build is None:
        _project(app, username, project_name)  # whose 404 says what is missing
        raise ApiError(404, f"There is no build {build_id} in {username}/{project_name}.")
    return build


def still_there(row):
    """`row`, re-read after a write; None means a delete won the race."""
    if row is None:
        raise ApiError(404, DELETED_MEANWHILE)
    return row


# Handlers --------------------------------------------------------------------
# Each takes the App first; those behind @token_required take the user next.

def dashboard(app):
    """The web dashboard (an HTML page; it asks for a token)."""
    page, headers = DASHBOARD_PAGE  # (made with the page, below)
    for name, value in headers.items():
        bottle.response.set_header(name, value)
    return page


def health(app):
    """Whether the server answers, and its database is still in its file
    (no token needed)."""
    if app.closing:
        raise shutting_down()
    if app.db.replaced():
        raise ApiError(503, "The database file was deleted or replaced while the server "
                            "ran: stop the server before you put a database back.")
    return {"status": "ok"}


def openapi(app):
    """This API as an OpenAPI 3.1 document (no token needed)."""
    return OPENAPI_DOCUMENT


@token_required
def whoami(app, user):
    """Who the token belongs to (Polyaxon's "get user": its client needs
    `email`, which no user here has, and reads `is_superuser`)."""
    admin = bool(user["is_admin"])
    return {"username": user["name"], "is_admin": admin, "email": None, "is_superuser": admin}


@token_required
def list_projects(app, user, username):
    """The user's projects, by name."""
    owner = _owner(app, username)
    limit, offset = page_params()
    count, rows = app.store.projects(owner["id"], limit, offset)
    return page(count, [project_json(r) for r in rows], limit, offset)


@token_required
def create_project(app, user, username):
    """Create a project; its command, env and timeout are its builds' defaults."""
    owner = _owner(app, username)
    fields = validate(read_json(), PROJECT_CREATE, required=("name",))
    project_id, taken = app.store.create_project(owner["id"], fields)
    if taken is not None:
        differs = "" if taken == fields["name"] else \
            f" by {taken!r} (names differing only in case would share a workspace folder)"
        raise ApiError(400, f"The project name {fields['name']!r} is taken{differs}.",
                       errors={"name": "is taken"})
    return created(project_json(still_there(app.store.project_by_id(project_id))))


@token_required
def get_project(app, user, username, project_name):
    """One project, with its builds' count and its last build."""
    return project_json(_project(app, username, project_name))


@token_required
def patch_project(app, user, username, project_name):
    """Change a project's description, command, env or timeout."""
    project = _project(app, username, project_name)
    fields = validate(read_json(empty_ok=True), PROJECT_PATCH)
    if fields:
        app.store.update_project(project["id"], fields)
    # By its id: a namesake made meanwhile is another project, which this changed nothing of.
    return project_json(still_there(app.store.project_by_id(project["id"])))


@token_required
def delete_project(app, user, username, project_name):
    """Delete a project with all its builds, statuses, logs and workspaces
    (running builds are stopped first)."""
    project = _project(app, username, project_name)
    message = f"stopped by {user['name']}: project deleted"
    with app.deleting_project(project["id"]):
        for last_round in (False, False, False, True):  # four rounds; the last gives up
            # Its builds stop, and what ended ones left goes: the next start
            # would find that by the rows about to go.
            stop_all(app, app.store.active_builds(project["id"]), message)
            app.runner.kill_groups_of_ended_builds(project_id=project["id"])
            # Nothing starts in here, and no namesake is made before its
            # workspaces are set aside. A build that started while the stops
            # were waited for (its create came just before the 409s) is
            # stopped first: deleted, its row could not tell the next start
            # to end what a crash left of it.
            with app.store.db.write():
                if app.store.runs_builds(project["id"]):
                    if last_round:
                        raise ApiError(503, "Builds of the project kept starting while it "
                                            "was deleted; nothing was deleted, try again.",
                                       headers={"Retry-After": "5"})
                    continue
                if not app.store.delete_project(project["id"]):
                    raise ApiError(404, DELETED_MEANWHILE)
                aside = _set_aside(app.config.workspaces, username, project_name)
                break
    app.runner.stop_project(project["id"], message, wait=app.config.stop_grace + 5)
    if aside is not None:  # (none if no build ever started there)
        _in_background(_remove, aside)
    return {"detail": f"Deleted the project {username}/{project_name}."}


def stop_all(app, build_ids, message):
    """Stop the builds and wait for those running to end; 503 when too many
    requests wait already (see App.wait_slots), before anything is stopped.
    (One that starts meanwhile is waited for too, outside the slots.)"""
    waits = any(app.runner.running(build_id) for build_id in build_ids)
    with _wait_slot(app, waits) as slot:
        if waits and not slot:
            raise ApiError(503, "Too many requests are waiting for builds to end; "
                                "try again shortly.", headers={"Retry-After": "5"})
        for build_id in build_ids:
            app.runner.stop(build_id, message)
        for build_id in build_ids:  # each already has its SIGTERM: wait for them together
            app.runner.stop(build_id, message, wait=app.config.stop_grace + 5, whole=True)


@contextlib.contextmanager
def _wait_slot(app, needed):
    """One of App.wait_slots for a request that waits on builds, if `needed`
    and one is free: whether it got one."""
    slot = needed and app.wait_slots.acquire(blocking=False)
    try:
        yield slot
    finally:
        if slot:
            app.wait_slots.release()


@token_required
def list_builds(app, user, username, project_name):
    """The project's builds, newest first; ?status=a,b filters on last_status."""
    project = _project(app, username, project_name)
    limit, offset = page_params()
    wanted = [s for s in (query_param("status") or "").split(",") if s]
    unknown = [s for s in wanted if s not in TRANSITIONS]
    if unknown:
        raise ApiError(400, f"Unknown status {unknown[0]!r}; statuses are "
                            f"{', '.join(STATUSES)}.", errors={"status": "unknown status"})
    count, rows = still_there(app.store.builds(project["id"], wanted, limit, offset))
    return page(count, [build_json(r) for r in rows], limit, offset)


@token_required
def create_build(app, user, username, project_name):
    """Create a build; a managed one (the default) is scheduled to run.
    command, env and timeout default to the project's (env is merged)."""
    project = _project(app, username, project_name)
    fields = without_dropped(validate(read_json(empty_ok=True), BUILD_CREATE,
                                      tolerated=POLYAXON_NULLABLE))
    fields["env"] = {**json.loads(project["env"]), **(fields.get("env") or {})}
    most = FIELDS["env"]["maxProperties"]
    if len(fields["env"]) > most:
        raise ApiError(400, f"With the project's, the build's env would hold "
                            f"{len(fields['env'])} pairs; a build holds at most {most}.",
                       errors={"env": f"at most {most} pairs with the project's"})
    fields.setdefault("timeout", project["timeout"])
    fields["command"] = fields.get("command") or project["command"]
    fields["is_managed"] = fields.get("is_managed") is not False  # Polyaxon sends null
    if fields["is_managed"] and not fields["command"]:
        raise ApiError(400, "There is no command to run: give one, or set the project's.",
                       errors={"command": "is required (the project has none)"})
    return start_build(app, project, user, fields)


def start_build(app, project, user, fields, restarted_from=None):
    """Make a build of `project` from validated `fields` (a create's, or a
    restart's copy) and answer 201 with it; a managed one goes to the runner."""
    if app.deleting[project["id"]]:
        raise ApiError(409, f"The project {project['owner']}/{project['name']} is being "
                            "deleted.")

    def make(running=False):
        return app.store.create_build(project["id"], user["name"], fields, restarted_from,
                                      running)
    build = app.runner.create(make) if fields.get("is_managed", True) else make()
    return created(build_json(still_there(build)))


@token_required
def invalidate_builds(app, user, username, project_name):
    """Polyaxon's invalidate of a project's builds: nothing to do (see
    invalidate_build)."""
    project = _project(app, username, project_name)
    return {"detail": f"Nothing to invalidate in {project['owner']}/{project['name']}: "
                      "builds are never reused."}


@token_required
def bookmarked_builds(app, user, username):
    """The bookmarked builds of the user's projects, newest first, as
    Polyaxon lists bookmarks: each result is {"content_object": build}."""
    owner = _owner(app, username)
    limit, offset = page_params()
    count, rows = app.store.bookmarked_builds(owner["id"], limit, offset)
    return page(count, [{"content_object": build_json(r)} for r in rows], limit, offset)


@token_required
def get_build(app, user, username, project_name, build_id):
    """One build."""
    return build_body(_build(app, username, project_name, build_id))


@token_required
def patch_build(app, user, username, project_name, build_id):
    """Change a build's name, description or tags."""
    build = _build(app, username, project_name, build_id)
    fields = without_dropped(validate(read_json(empty_ok=True), BUILD_PATCH))
    if fields.pop("merge", None) and "tags" in fields:  # (Polyaxon's log_tags; none: no change)
        if not app.store.add_tags(build["id"], fields.pop("tags") or []):
            most = FIELDS["tags"]["maxItems"]
            raise ApiError(400, f"With the build's, there would be more than {most} tags.",
                           errors={"tags": f"at most {most} with the build's"})
    if fields:
        app.store.update_build(build["id"], fields)
    return build_json(still_there(app.store.build(build["id"])))


def set_bookmark(app, username, project_name, build_id, bookmarked):
    """Bookmark a build or take its bookmark away; answer with the build."""
    build = _build(app, username, project_name, build_id)
    app.store.bookmark(build["id"], bookmarked)
    return build_json(still_there(app.store.build(build["id"])))


@token_required
def bookmark_build(app, user, username, project_name, build_id):
    """Bookmark a build: its `bookmarked` turns true."""
    return set_bookmark(app, username, project_name, build_id, True)


@token_required
def unbookmark_build(app, user, username, project_name, build_id):
    """Remove a build's bookmark."""
    return set_bookmark(app, username, project_name, build_id, False)


@token_required
def get_code_reference(app, user, username, project_name, build_id):
    """The code the build was made from, as recorded by POST (all null until then)."""
    build = _build(app, username, project_name, build_id)
    reference = json.loads(build["code_reference"] or "{}")
    return {name: reference.get(name) for name in CODE_REFERENCE}


@token_required
def set_code_reference(app, user, username, project_name, build_id):
    """Record the code the build was made from (replacing any before)."""
    build = _build(app, username, project_name, build_id)
    fields = validate(read_json(empty_ok=True), CODE_REFERENCE_BODY)
    reference = {name: None if fields.get(name) == "HEAD" and CODE_REFERENCE_BODY[name]
                 is _COMMIT_OR_HEAD else fields.get(name) for name in CODE_REFERENCE}
    app.store.update_build(build["id"], {"code_reference": reference})
    still_there(app.store.build(build["id"]))  # (else nothing was recorded)
    return created(reference)


@token_required
def invalidate_build(app, user, username, project_name, build_id):
    """Polyaxon's invalidate, answered with the build unchanged: builds are
    never reused here, so there is nothing to invalidate."""
    return build_json(_build(app, username, project_name, build_id))


@token_required
def heartbeat(app, user, username, project_name, build_id):
    """The heartbeat Polyaxon's tracking client sends while it runs a build:
    answered, not recorded (a build's status says whether it runs)."""
    _build(app, username, project_name, build_id)
    return {"status": "ok"}


@token_required
def delete_build(app, user, username, project_name, build_id):
    """Delete a build with its statuses, log and workspace (stopped first)."""
    build = _build(app, username, project_name, build_id)
    stop_all(app, [build["id"]], f"stopped by {user['name']}: build deleted")
    app.runner.kill_groups_of_ended_builds(build_uuid=build["uuid"])
    with app.store.db.write():  # as for a project: a namesake's build never loses its workspace
        if not app.store.delete_build(build["id"]):
            raise ApiError(404, DELETED_MEANWHILE)
        aside = _set_aside(app.config.workspaces, username, project_name, str(build["number"]))
    if aside is not None:  # (none if no build ever started there)
        _in_background(_remove, aside)
    return {"detail": f"Deleted build {build['number']} of {username}/{project_name}."}


@token_required
def stop_build(app, user, username, project_name, build_id):
    """Stop a build: at once if it has not started, else SIGTERM then SIGKILL.
    A finished build is answered unchanged."""
    build = _build(app, username, project_name, build_id)
    # Most builds obey SIGTERM at once, and the others get SIGKILL after the
    # grace: wait a moment, so the answer says `stopped` (or `stopping`);
    # not when too many requests wait already (see App.wait_slots).
    with _wait_slot(app, app.runner.running(build["id"])) as slot:
        app.runner.stop(build["id"], f"stopped by {user['name']}",
                        wait=STOP_ANSWER_SECONDS if slot else 0.0, told=1.0)
    return build_json(still_there(app.store.build(build["id"])))


@token_required
def restart_build(app, user, username, project_name, build_id):
    """A new build with the same command, env, timeout, name and tags."""
    build = _build(app, username, project_name, build_id)
    project = _project(app, username, project_name)
    if project["id"] != build["project_id"]:  # a namesake made since the build was looked up
        raise ApiError(404, DELETED_MEANWHILE)
    fields = {"command": build["command"], "env": json.loads(build["env"]),
              "timeout": build["timeout"], "name": build["name"],
              "tags": json.loads(build["tags"]), "is_managed": bool(build["is_managed"])}
    return start_build(app, project, user, fields, restarted_from=build["number"])


@token_required
def list_statuses(app, user, username, project_name, build_id):
    """A build's status history, oldest first."""
    build = _build(app, username, project_name, build_id)
    limit, offset = page_params()
    count, rows = app.store.statuses(build["id"], limit, offset)
    return page(count, [status_json(r, build["number"]) for r in rows], limit, offset)


@token_required
def report_status(app, user, username, project_name, build_id):
    """Report a status of an unmanaged build, as the status machine allows."""
    build = _build(app, username, project_name, build_id)
    fields = validate(read_json(), STATUS_REPORT, required=("status",))
    if build["is_managed"]:
        raise ApiError(400, "This build is managed: the server reports its statuses.")
    message = "\n".join(filter(None, (fields.get("message"), fields.get("traceback")))) or None
    entry = app.store.report(build["id"], fields["status"], message)
    if entry is None:
        current = still_there(app.store.build(build["id"]))["last_status"]
        raise ApiError(400, f"A build cannot go from {current} to {fields['status']}.",
                       errors={"status": f"not allowed after {current}"})
    return created(status_json(entry, build["number"]))


@token_required
def get_status(app, user, username, project_name, build_id, status_id):
    """One status entry, by its number within the build or its uuid."""
    build = _build(app, username, project_name, build_id)
    number, uuid = whole_number(status_id), _status_uuid(status_id)
    entry = None
    if number is not None or uuid is not None:
        entry = app.store.status(build["id"], number=number, uuid=uuid)
    if entry is None:
        raise ApiError(404, f"Build {build['number']} has no status {status_id}.")
    return status_json(entry, build["number"])


@token_required
def get_logs(app, user, username, project_name, build_id):
    """A build's log: raw text (streamed; ?follow=1 until the build ends) or a
    JSON page. ?offset and ?limit count bytes, ?tail lines."""
    build = _build(app, username, project_name, build_id)
    request = bottle.request
    follow = flag_param("follow")  # text only: it wins over an Accept (HTTPie's) for JSON
    fmt = query_param("format") or (
        "json" if not follow and prefers_json(request.environ.get("HTTP_ACCEPT", ""))
        else "text")
    if fmt not in ("text", "json"):
        raise ApiError(400, "The query parameter format must be text or json.",
                       errors={"format": "must be text or json"})
    if follow and fmt == "json":
        raise ApiError(400, "follow works with the text format only.",
                       errors={"follow": "needs format=text"})
    size, final = build["log_size"], build["last_status"] in FINAL
    offset = int_param("offset", 0, 0, 2 ** 62)
    tail = int_param("tail", None, 0, 10 ** 7)
    if tail is not None:  # the last lines, of those from offset on
        offset = max(offset, app.store.tail_offset(build["id"], size, tail))
    if fmt == "json":
        limit = min(int_param("limit", LOG_JSON_DEFAULT, 1, 2 ** 62), LOG_JSON_MAX)
        return log_page(app.store, build, min(offset, size), limit, size, final)
    limit = int_param("limit", None, 1, 2 ** 62)
    bottle.response.content_type = "text/plain; charset=utf-8"
    bottle.response.set_header("X-Log-Size", str(size))
    bottle.response.set_header("X-More-Data", "false" if final else "true")
    if not follow or final:
        start = min(offset, size)
        end = size if limit is None else min(size, start + limit)
        bottle.response.set_header("Content-Length", str(end - start))
        return LogFile(app.store, build, start, end)
    if app.closing:
        raise shutting_down()
    if not app.wait_slots.acquire(blocking=False):
        raise ApiError(503, "Too many log followers (or stops and deletes waiting for "
                            "builds) at once; try again shortly.",
                       headers={"Retry-After": "5"})
    end = float("inf") if limit is None else offset + limit
    # nginx, as a bare proxy_pass leaves it (HTTP/1.0 to the server, answers
    # buffered), held a follow's output until its build ended.
    bottle.response.set_header("X-Accel-Buffering", "no")
    return LogStream(app.store, app.bus, build, offset, end, request.environ,
                     on_close=app.wait_slots.release, allowed=functools.partial(
                         _still_authenticated, app.store, user["id"],
                         request.environ.get("HTTP_AUTHORIZATION", "")))


def log_page(store, build, offset, limit, size, final):
    """A JSON page of the log from `offset`: whole characters, and whole lines
    while more may come (see get_logs)."""
    end = min(size, offset + limit)
    data = store.log_bytes(build["id"], build["uuid"], offset, end)
    if data and _utf8_boundary(data) == 0:
        # The limit ends inside the first character: send it whole, or the
        # page would be empty and its next_offset would never move on.
        end = min(size, offset + _utf8_length(data[0]))
        data = store.log_bytes(build["id"], build["uuid"], offset, end)
    if not (final and end == size):  # the rest of a character may still come
        data = data[:_utf8_boundary(data)]
    if not final and b"\n" in data:
        data = data[:data.rfind(b"\n") + 1]  # whole lines while more may come
    next_offset = offset + len(data)
    return {"job": build["number"], "offset": offset, "next_offset": next_offset,
            "size": size, "complete": final and next_offset == size,
            "truncated": bool(build["truncated"]),
            "text": data.decode("utf-8", "replace")}


@token_required
def append_logs(app, user, username, project_name, build_id):
    """Append the body to an unmanaged build's log (a JSON string's text,
    or raw bytes)."""
    build = _build(app, username, project_name, build_id)
    body = read_body(LOG_BODY_LIMIT)
    if build["is_managed"]:
        raise ApiError(400, "This build is managed: the server captures its log.")
    if build["last_status"] in FINAL:
        raise ApiError(400, f"The build is {build['last_status']}: its log is closed.")
    if bottle.request.content_type.split(";")[0].strip() == "application/json":
        body = _json_log_text(body)
    try:  # checked again as it is written: a status report may have come meanwhile
        size, _ = still_there(app.store.append_log(build["id"], body, app.config.max_log_bytes))
    except LogClosed as e:
        raise ApiError(400, f"The build is {e}: its log is closed.") from None
    return {"size": size}


# The routing table -----------------------------------------------------------

BUILD_PATH = "/api/v1/<username>/<project_name>/builds/<build_id>"
ROUTES = [
    Route("GET", "/", dashboard, answer=(200, "HTML")),
    Route("GET", "/api/v1/health", health, answer=(200, "Health")),
    Route("GET", "/api/v1/openapi.json", openapi, answer=(200, "OpenAPI")),
    Route("GET", "/api/v1/users", whoami, answer=(200, "User")),
    Route("GET", "/api/v1/bookmarks/<username>/builds", bookmarked_builds, query=PAGE_QUERY,
          answer=(200, "BookmarkPage")),
    Route("GET", "/api/v1/<username>", list_projects, query=PAGE_QUERY,
          answer=(200, "ProjectPage")),
    Route("POST", "/api/v1/<username>", create_project, body=(PROJECT_CREATE, ["name"]),
          answer=(201, "Project")),
    Route("GET", "/api/v1/<username>/<project_name>", get_project, answer=(200, "Project")),
    Route("PATCH", "/api/v1/<username>/<project_name>", patch_project,
          body=(PROJECT_PATCH, []), answer=(200, "Project")),
    Route("DELETE", "/api/v1/<username>/<project_name>", delete_project),
    Route("GET", "/api/v1/<username>/<project_name>/builds", list_builds,
          query=BUILDS_QUERY, answer=(200, "BuildPage")),
    Route("POST", "/api/v1/<username>/<project_name>/builds", create_build,
          body=({**BUILD_CREATE, **{name: {"type": "null", "description": "ignored"}
                                    for name in sorted(POLYAXON_NULLABLE)}}, []),
          answer=(201, "Build")),
    Route("POST", "/api/v1/<username>/<project_name>/builds/invalidate", invalidate_builds),
    Route("GET", BUILD_PATH, get_build, answer=(200, "Build")),
    Route("PATCH", BUILD_PATH, patch_build, body=(BUILD_PATCH, []), answer=(200, "Build")),
    Route("DELETE", BUILD_PATH, delete_build),
    Route("POST", BUILD_PATH, stop_build, answer=(200, "Build")),
    Route("POST", BUILD_PATH + "/stop", stop_build, answer=(200, "Build")),
    Route("POST", BUILD_PATH + "/restart", restart_build, answer=(201, "Build")),
    Route("GET", BUILD_PATH + "/statuses", list_statuses, query=PAGE_QUERY,
          answer=(200, "StatusPage")),
    Route("POST", BUILD_PATH + "/statuses", report_status, body=(STATUS_REPORT, ["status"]),
          answer=(201, "Status")),
    Route("GET", BUILD_PATH + "/statuses/<status_id>", get_status, answer=(200, "Status")),
    Route("GET", BUILD_PATH + "/logs", get_logs, query=LOG_QUERY, answer=(200, "LogText")),
    Route("POST", BUILD_PATH + "/logs", append_logs, body="log", answer=(200, "LogSize")),
    Route("POST", BUILD_PATH + "/bookmark", bookmark_build, answer=(200, "Build")),
    Route("DELETE", BUILD_PATH + "/unbookmark", unbookmark_build, answer=(200, "Build")),
    Route("GET", BUILD_PATH + "/coderef", get_code_reference, answer=(200, "CodeReference")),
    Route("POST", BUILD_PATH + "/coderef", set_code_reference, body=(CODE_REFERENCE_BODY, []),
          answer=(201, "CodeReference")),
    Route("POST", BUILD_PATH + "/invalidate", invalidate_build, answer=(200, "Build")),
    Route("POST", BUILD_PATH + "/_heartbeat", heartbeat, answer=(200, "Health")),
]
OPENAPI_DOCUMENT = openapi_document(ROUTES)


def make_routes(app):
    """A Bottle application that serves ROUTES for `app`."""
    web = bottle.Bottle()
    # Fixed paths that a path with parameters would match too: without these,
    # POST /api/v1/health would be create_project for a user called "health",
    # and GET .../builds/invalidate a build called "invalidate". (First: Bottle
    # tries the routes with parameters in the order they were added.)
    paths = {r.path for r in ROUTES}
    for path in sorted(p for p in paths if _shadowed(p, paths)):
        allowed = _allowed(r.method for r in ROUTES if r.path == path)
        # ANY: Bottle's own 405 would name every method routed here.
        others = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "ANY")
                  if m not in allowed]
        web.route(path, others, _answering(app, functools.partial(_not_allowed, allowed)))
    for route in ROUTES:
        web.route(route.path, route.method, _answering(app, route.handler),
                  bodiless=route.method != "GET" and route.body is None)
    web.default_error_handler = _error_page
    return web


def _shadowed(path, paths):
    """Whether another of `paths` has a parameter where `path` has a name."""
    mine = path.split("/")
    return any(len(other) == len(mine) and other != mine and
               all(o == m or o.startswith("<") for o, m in zip(other, mine))
               for other in (p.split("/") for p in paths))


def _allowed(methods):
    """The methods an Allow header names: HEAD goes with GET (Bottle answers
    it with GET's route)."""
    methods = set(methods)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _not_allowed(allowed, _app, **params):
    raise ApiError(405, _use_instead(allowed), headers={"Allow": ",".join(allowed)})


def _use_instead(allowed):
    return f"{bottle.request.method} is not allowed here; use {', '.join(allowed)}."


def shutting_down():
    return ApiError(503, "The server is shutting down.", headers={"Retry-After": "5"})


def created(body):
    bottle.response.status = 201
    return body


def _answering(app, handler):
    """Turn a handler's dict into JSON, and every failure into the one error shape."""
    @functools.wraps(handler)
    def wrapper(**params):
        response = bottle.response
        response.set_header("X-Content-Type-Options", "nosniff")  # a log is text, whatever it holds
        try:
            # Reads are answered to the end: a client whose follow ended with
            # the shutdown's stop asks next how its build ended.
            if app.closing and bottle.request.method not in ("GET", "HEAD"):
                raise shutting_down()
            result = handler(app, **params)
        except ApiError as e:
            response.status = e.status
            for name, value in e.headers.items():
                response.set_header(name, value)
            result = e.body()
        except Exception as e:
            if unavailable(e):  # the machine's fault (a full disk, say), not a bug
                log.error("%s %s: the database failed: %s", bottle.request.method,
                          repr(bottle.request.path)[1:-1], e)
                response.status = 503
                response.set_header("Retry-After", "30")
                result = {"detail": f"The server cannot use its database right now ({e}). "
                                    "Try again later."}
            else:
                log.exception("internal error in %s %s", bottle.request.method,
                              bottle.request.path)
                response.status = 500
                result = {"detail": "internal error"}
        if isinstance(result, (dict, JSONBytes)):
            response.content_type = "application/json"
            return result if isinstance(result, JSONBytes) else json_bytes(result)
        return result
    return wrapper


def _error_page(error):
    """Bottle's own errors (unknown route, wrong method) in the one error shape."""
    bottle.response.content_type = "application/json"
    bottle.response.set_header("X-Content-Type-Options", "nosniff")
    if error.status_code == 404:
        detail = _no_endpoint(bottle.request.path)
    elif error.status_code == 405:
        allowed = _allowed(_methods_that_answer(
            bottle.request, (method for method in error.headers.get("Allow", "").split(",")
                             if method)))
        if not allowed:
            bottle.response.status = 404
            del bottle.response["Allow"]
            return json_bytes({"detail": _no_endpoint(bottle.request.path)})
        bottle.response.set_header("Allow", ",".join(allowed))
        detail = _use_instead(allowed)
    else:
        detail = "internal error" if error.status_code >= 500 else str(error.body)
    return json_bytes({"detail": detail})


def _no_endpoint(path):
    return f"There is no endpoint at {path}."


def _methods_that_answer(request, methods):
    """Of the methods Bottle has routes for at the request's path, those that
    would not answer 404 at once: not a user namespace named like a fixed path
    (/api/v1/health/x), nor a build id that is no number (.../builds/invalidate
    as a build), nor a status id that is neither a number nor a uuid."""
    answering = []
    for method in methods:
        try:
            _, params = request.app.router.match({"PATH_INFO": request.path,
                                                  "REQUEST_METHOD": method})
        except bottle.HTTPError:
            continue
        if params.get("username") not in RESERVED_USERNAMES and \
                whole_number(params.get("build_id", "0")) is not None and \
                _is_status_id(params.get("status_id", "0")):
            answering.append(method)
    return answering


def _is_status_id(text):
    """A status's number within its build, or its uuid."""
    return whole_number(text) is not None or _status_uuid(text) is not None


UUID_RE = re.compile(r"[0-9a-f]{8}(-?)[0-9a-f]{4}\1[0-9a-f]{4}\1[0-9a-f]{4}\1[0-9a-f]{12}", re.I)


def _status_uuid(text):
    """A uuid as statuses store it (32 hex digits, lower case), from that or
    its usual hyphenated form (8-4-4-4-12), in either case; else None."""
    return text.replace("-", "").lower() if UUID_RE.fullmatch(text) else None


def _json_log_text(body):
    """A JSON string's text (or, as Polyaxon's tracker sends, a list of lines)
    as log bytes; any other body, JSON or not, as it is."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        value = "".join(line + "\n" for line in value)
    if not isinstance(value, str):
        return body
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, LONE_SURROGATE) from None


###############################################################################
# The dashboard page ##########################################################
###############################################################################
# Served at GET / : plain HTML, CSS and JavaScript, no external assets (the
# server may have no internet). It keeps the token in the browser's local
# storage and talks to the REST API above with the Authorization header.

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>buildserver</title>
<link rel="icon" href="data:,">
<style>
:root {
  color-scheme: light dark;
  --bg: #f4f5f7; --fg: #1b212c; --muted: #586273; --card: #fff; --border: #d7dbe2;
  --accent: #1f56d1; --accent-fg: #fff; --focus: #1f56d1; --code-bg: #eceff3;
  --log-bg: #10151c; --log-fg: #d7dee8;
  --ok: #12652b; --ok-bg: #dff3e5; --bad: #b0241a; --bad-bg: #fde3e0;
  --run: #1c48c4; --run-bg: #e0e9ff; --wait: #744b00; --wait-bg: #fbefcf;
  --halt: #8f3a00; --halt-bg: #ffe5cf; --off: #474f5c; --off-bg: #e8ebef;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0e1217; --fg: #e2e6ed; --muted: #9aa4b3; --card: #161b22; --border: #2c333d;
    --accent: #6f9fff; --accent-fg: #0a1020; --focus: #8db4ff; --code-bg: #1f252e;
    --ok: #7fe0a0; --ok-bg: #133220; --bad: #ff9a90; --bad-bg: #3d1714;
    --run: #9dbbff; --run-bg: #172a52; --wait: #f3cf72; --wait-bg: #3a2d0c;
    --halt: #ffb27a; --halt-bg: #40230d; --off: #b8c0cc; --off-bg: #262c35;
  }
}
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
a { color: var(--accent); }
:focus-visible { outline: 3px solid var(--focus); outline-offset: 2px; }
h1:focus, h2:focus { outline: none; }
h1 { font-size: 1.45rem; margin: 0 0 .75rem; overflow-wrap: anywhere; }
h1 + p.muted { margin-top: -.5rem; }
h2 { font-size: 1.1rem; margin: 1.5rem 0 .6rem; }
code, pre, textarea, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
code { white-space: nowrap; background: var(--code-bg); padding: .05rem .3rem; border-radius: 4px; font-size: .9em; }
.muted { color: var(--muted); }
.vh { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
[hidden] { display: none !important; }

.top { display: flex; flex-wrap: wrap; align-items: center; gap: .4rem 1rem; padding: .6rem 1rem;
  background: var(--card); border-bottom: 1px solid var(--border); }
.brand { font-weight: 700; color: var(--fg); text-decoration: none; }
.crumbs ol { display: flex; flex-wrap: wrap; list-style: none; margin: 0; padding: 0; }
.crumbs li { overflow-wrap: anywhere; }
.crumbs li + li::before { content: "/"; color: var(--muted); padding: 0 .4rem; }
.who { margin-left: auto; display: flex; align-items: center; gap: .6rem; flex-wrap: wrap; }
main { max-width: 72rem; margin: 0 auto; padding: 1.25rem 1rem 3rem; }
main p { overflow-wrap: anywhere; }   /* a long name or URL wraps, not the page */
main:focus { outline: none; }
#notice { max-width: 72rem; margin: .75rem auto 0; padding: 0 1rem; }

button { font: inherit; min-height: 2.25rem; padding: .35rem .9rem; border-radius: 6px;
  border: 1px solid var(--border); background: var(--card); color: var(--fg); cursor: pointer; }
button:hover:not(:disabled) { border-color: var(--muted); }
button.primary { background: var(--accent); border-color: var(--accent); color: var(--accent-fg); font-weight: 600; }
button.danger { color: var(--bad); border-color: currentColor; font-weight: 600; }
button:disabled { opacity: .45; cursor: not-allowed; }
button.small { min-height: 1.9rem; padding: .15rem .6rem; font-size: .9em; }
.actions { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin: .75rem 0; }

.card > h2:first-child { margin-top: 0; }
.card > .fields + form { margin-top: 1rem; padding-top: .25rem; border-top: 1px solid var(--border); }
.card { background: var(--card); border: 1px solid var(--border); border-radius: 10px; padding: 1rem 1.25rem; }
.login { max-width: 32rem; margin: 2rem auto; }
details.card { margin-bottom: 1.25rem; }
label { font-weight: 600; }
.field { display: block; margin: .7rem 0 .25rem; }
input[type=text], input[type=password], textarea { width: 100%; font: inherit; padding: .45rem .6rem;
  border: 1px solid var(--border); border-radius: 6px; background: var(--bg); color: var(--fg); }
textarea { font-size: .9em; resize: vertical; }
.hint { font-size: .88em; color: var(--muted); margin: .25rem 0; }
.error { color: var(--bad); background: var(--bad-bg); padding: .5rem .75rem; border-radius: 6px; margin: .6rem 0; }
.info { background: var(--code-bg); padding: .5rem .75rem; border-radius: 6px; margin: .6rem 0; }
.error:empty, .info:empty { display: none; }
details.more { margin-top: .75rem; }
details.more > summary { cursor: pointer; color: var(--accent); width: fit-content; }
form.inline { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin: .5rem 0 1rem; }
form.inline input { width: 14rem; max-width: 100%; }

.badge { display: inline-flex; align-items: center; gap: .3em; padding: .05rem .6rem; border-radius: 999px;
  font-size: .85rem; font-weight: 600; white-space: nowrap; color: var(--x); background: var(--x-bg); }
.st-succeeded { --x: var(--ok); --x-bg: var(--ok-bg); }
.st-failed { --x: var(--bad); --x-bg: var(--bad-bg); }
.st-running { --x: var(--run); --x-bg: var(--run-bg); }
.st-scheduled { --x: var(--wait); --x-bg: var(--wait-bg); }
.st-stopping { --x: var(--halt); --x-bg: var(--halt-bg); }
.st-stopped, .st-created { --x: var(--off); --x-bg: var(--off-bg); }
.st-running .sym { animation: pulse 1.4s ease-in-out infinite; }
@keyframes pulse { 50% { opacity: .35; } }
@media (prefers-reduced-motion: reduce) { .st-running .sym, .live::before { animation: none; } }
.tag { display: inline-block; background: var(--code-bg); border-radius: 4px; padding: 0 .4rem; margin: 0 .25rem .15rem 0; font-size: .85em; }

table.list { width: 100%; border-collapse: collapse; background: var(--card); border: 1px solid var(--border); border-radius: 10px; }
.list th, .list td { text-align: left; padding: .5rem .75rem; border-bottom: 1px solid var(--border); vertical-align: top; overflow-wrap: anywhere; }
.list th { font-size: .82rem; color: var(--muted); font-weight: 600; }
.list tr:last-child td { border-bottom: 0; }
.list .num { text-align: right; white-space: nowrap; }
.pager { display: flex; flex-wrap: wrap; gap: 1rem; align-items: center; justify-content: space-between; margin: .75rem 0; }
.filter { border: 0; padding: 0; margin: 0 0 .75rem; display: flex; flex-wrap: wrap; gap: .4rem; align-items: center; }
.filter legend { float: left; margin-right: .4rem; font-weight: 600; font-size: .9rem; }
.chip { display: inline-flex; align-items: center; gap: .3rem; padding: .1rem .6rem .1rem .4rem; border-radius: 999px;
  border: 1px solid var(--border); background: var(--card); font-weight: 500; font-size: .88rem; cursor: pointer; }
.chip:has(input:checked) { color: var(--x); background: var(--x-bg); border-color: currentColor; }
.chip input { margin: 0; }

.head { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: center; }
.head h1 { margin: 0; }
.cols { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 1rem; align-items: start; }
.fields { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: .35rem 1rem; margin: 0; }
.fields dt { color: var(--muted); }
.fields dd { margin: 0; min-width: 0; overflow-wrap: anywhere; }
pre.cmd { margin: 0; padding: .4rem .6rem; background: var(--code-bg); border-radius: 6px; white-space: pre-wrap;
  overflow-wrap: anywhere; font-size: .88em; max-height: 14rem; overflow: auto; }
ol.timeline { list-style: none; margin: 0 0 0 .75rem; padding: 0; border-left: 2px solid var(--border); }
.timeline li { position: relative; padding: 0 0 .8rem 1.3rem; }
.timeline .dot { position: absolute; left: -.8rem; top: .05rem; width: 1.5rem; height: 1.5rem; border-radius: 50%;
  display: grid; place-items: center; font-size: .75rem; color: var(--x); background: var(--x-bg); border: 2px solid var(--card); }
.timeline .msg { color: var(--muted); font-size: .9em; overflow-wrap: anywhere; }

.loghead { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: center; margin: 1.5rem 0 .5rem; }
.loghead h2 { margin: 0; }
.loghead .opts { margin-left: auto; display: flex; gap: .75rem; align-items: center; flex-wrap: wrap; font-size: .9em; }
.loghead .opts label { font-weight: 500; }
.live { color: var(--run); font-size: .9em; font-weight: 600; }
.live::before { content: "●"; margin-right: .3em; animation: pulse 1.4s ease-in-out infinite; }
.logwrap { position: relative; }
.logbox { margin: 0; background: var(--log-bg); color: var(--log-fg); border-radius: 8px; padding: .75rem 1rem;
  font-size: 13px; line-height: 1.45; min-height: 6rem; max-height: 70vh; overflow: auto;
  white-space: pre-wrap; overflow-wrap: anywhere; tab-size: 8; }
.logbox.nowrap { white-space: pre; overflow-wrap: normal; }
.logbox:focus-visible { outline-offset: 1px; }
.logbox .note { color: #8b96a5; font-style: italic; }
.logbox .lines { content-visibility: auto; }
.logbox .piece, .logbox .open { display: inline-block; vertical-align: top; }
.logbox .open { overflow-anchor: none; }  /* kept in view, it took a reader up the page back down */
#latest { position: absolute; right: 1rem; bottom: .75rem; box-shadow: 0 2px 8px rgba(0, 0, 0, .35); }
#earlier { margin-bottom: .5rem; }

@media (max-width: 48rem) {
  .cols { grid-template-columns: minmax(0, 1fr); }
  main { padding: 1rem .75rem 2.5rem; }
  .card { padding: .9rem; }
  table.list, .list tbody, .list tr, .list td { display: block; }
  table.list { border: 0; background: none; }
  .list thead { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
  .list tr { background: var(--card); border: 1px solid var(--border); border-radius: 10px; padding: .5rem .75rem; margin-bottom: .5rem; }
  .list td { display: flex; gap: .75rem; padding: .12rem 0; border: 0; }
  .list td::before { content: attr(data-label); flex: 0 0 6.5rem; color: var(--muted); font-size: .85rem; }
  .list .num { text-align: left; }
  .logbox { font-size: 12px; padding: .6rem; }
}
</style>
</head>
<body>
<header class="top">
  <a class="brand" href="#/">buildserver</a>
  <nav class="crumbs" aria-label="Breadcrumb"><ol id="crumbs"></ol></nav>
  <div class="who" id="who" hidden>
    <span>Signed in as <strong id="who-name"></strong></span>
    <button type="button" class="small" id="forget">Forget token</button>
  </div>
</header>
<div id="notice" role="alert"></div>
<main id="main" tabindex="-1"><p class="muted">Loading…</p></main>
<script>
'use strict';
// buildserver's dashboard: one page, hash routes (#/, #/alice, #/alice/app,
// #/alice/app/builds/3), talking to /api/v1 with the token kept in localStorage.
// Every piece of API data reaches the page through textContent, never as HTML.

// Behind a path prefix too. Slashes collapsed: at "//" it read "//api/v1", a
// host named "api" to fetch(), which would have been sent the token.
const API = new URL('api/v1', document.baseURI).pathname.replace(/\/{2,}/g, '/');
const ME_PATH = '/users';                                       // {"username", "is_admin"}
const TOKEN_KEY = 'buildserver.token';
const PAGE = 20;                 // list items per page
const LOG_PAGE = 256 * 1024;     // bytes of log fetched at once (the tail, or one "load earlier")
const LOG_KEEP = 2 * 1024 * 1024;  // bytes kept in the page while following (to twice that); older ones are dropped
const LOG_HOLD = 2 * LOG_KEEP;   // bytes a page scrolled up holds; newer output then waits undrawn
const REFRESH_MS = 5000;         // status refresh while builds are active (the log itself streams)
const READ_MS = 30000;           // a read that gets nothing for this long fails: a stalled server or proxy
const STATUSES = ['created', 'scheduled', 'running', 'stopping', 'succeeded', 'failed', 'stopped'];
const SYMBOL = {created: '○', scheduled: '…', running: '▶', stopping: '◼', succeeded: '✓', failed: '✗', stopped: '■'};
const FINAL = new Set(['succeeded', 'failed', 'stopped']);
const STOPPABLE = new Set(['created', 'scheduled', 'running']);
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/;
const RESERVED = new Set(['health', 'users', 'openapi.json', 'bookmarks']);   // API paths, never users
const NAME_PATTERN = '[A-Za-z0-9][A-Za-z0-9_\\-]{0,63}';   // the same, for pattern="" (which uses the v flag)
const BUILD_NAME_PATTERN = '[A-Za-z0-9_\\-]{1,128}';   // a build's name (server: FIELDS["name"])
const EXPIRED = 'Your saved token is no longer accepted (it may have been replaced). Enter a new one.';

const main = document.getElementById('main');
const noticeEl = document.getElementById('notice');
let token = readToken();
let me = null;     // {username, is_admin} once the token is known good
let view = null;   // the current page: {path, signal, timers, update}

// Helpers ---------------------------------------------------------------------

function readToken() {
  try { return localStorage.getItem(TOKEN_KEY); } catch (e) { return null; }
}

function saveToken(value) {
  try {
    if (value) localStorage.setItem(TOKEN_KEY, value); else localStorage.removeItem(TOKEN_KEY);
  } catch (e) { /* storage disabled: the token lasts as long as the page */ }
}

/** An element: attributes (functions become listeners), then children (strings become text). */
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value == null || value === false) continue;
    if (typeof value === 'function') el.addEventListener(key.replace(/^on/, ''), value);
    else if (key === 'class') el.className = value;
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const kid of kids.flat(Infinity)) {   // text as it reads: see visibleControls
    if (kid != null && kid !== false) el.append(kid instanceof Node ? kid : visibleControls(String(kid)));
  }
  return el;
}

const sym = s => h('span', {class: 'sym', 'aria-hidden': 'true'}, SYMBOL[s] || '?');
const badge = s => h('span', {class: `badge st-${s}`}, sym(s), s);
const tags = list => list && list.length ? list.map(t => h('span', {class: 'tag'}, t)) : h('span', {class: 'muted'}, '—');

function parseTime(iso) {
  return iso ? new Date(iso.replace(/(\.\d{3})\d+/, '$1')) : null;
}

function ago(iso) {
  const s = (Date.now() - parseTime(iso)) / 1000;
  if (s < 5) return 'just now';
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  if (s < 30 * 86400) return `${Math.floor(s / 86400)} d ago`;
  return parseTime(iso).toLocaleDateString();
}

const timeText = (iso, long) => long ? `${parseTime(iso).toLocaleString()} (${ago(iso)})` : ago(iso);

function when(iso, long) {
  if (!iso) return h('span', {class: 'muted'}, '—');
  return h('time', {datetime: iso, title: parseTime(iso).toLocaleString(), 'data-ago': true,
                    'data-long': long}, timeText(iso, long));
}

// A list is drawn again only when it changes: its "just now" would stay for hours.
setInterval(() => {
  if (document.hidden) return;
  for (const t of document.querySelectorAll('time[data-ago]')) {   // (not a timeline's clock times)
    const text = timeText(t.getAttribute('datetime'), t.hasAttribute('data-long'));
    if (t.textContent !== text) t.textContent = text;
  }
}, 5000);

function duration(s) {
  if (s == null) return '—';
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function sleep(ms, signal) {
  return new Promise(resolve => {
    const end = () => { clearTimeout(timer); if (signal) signal.removeEventListener('abort', end); resolve(); };
    const timer = setTimeout(end, ms);
    if (signal) signal.addEventListener('abort', end);
  });
}

/** Make `nodes` the page's content (null and false are skipped). */
function show(...nodes) { main.replaceChildren(...nodes.flat(Infinity).filter(Boolean)); }

let refreshNotice = false;   // the notice says a refresh failed: the next refresh that works takes it away
function notify(message, byRefresh = false) {
  refreshNotice = byRefresh;
  noticeEl.replaceChildren(...(message ? [h('p', {class: 'error'}, message)] : []));
}

// A button disabled while it works loses the focus to the page: give it back
// (to the first of `candidates` that can take it), unless the reader moved on.
function refocus(...candidates) {
  if (document.activeElement !== document.body) return;
  const next = candidates.find(el => !el.disabled && !el.hidden);
  if (next) next.focus({preventScroll: true});   // (it was just used: in view)
}

// The API ---------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, errors) { super(message); this.status = status; this.errors = errors; }
}

/** A signal that aborts with `outer` (leaving the page), or once READ_MS pass
 * with nothing received (`late`; each piece of the body puts it off, so a
 * slow link is no stall): a read that stalls would keep the button that
 * asked disabled, and a page's refreshes would pile up behind it. Not for
 * writes: a late answer may still be a yes (a stop waits for its build). */
function readDeadline(outer) {
  const ctl = new AbortController(), abort = () => ctl.abort();
  const d = {signal: ctl.signal, late: false, timer: null,
             putOff() { clearTimeout(d.timer); d.timer = setTimeout(() => { d.late = true; abort(); }, READ_MS); },
             end() { clearTimeout(d.timer); if (outer) outer.removeEventListener('abort', abort); }};
  d.putOff();
  if (outer && outer.aborted) abort(); else if (outer) outer.addEventListener('abort', abort);
  return d;
}

function unreachable() {
  return new ApiError(0, 'The server cannot be reached. Check that it is running, then try again.');
}

function tooSlow(d, e) {
  return d.late ? new ApiError(0, `The server sent nothing for ${READ_MS / 1000} seconds. ` +
                                  'Check that it is running, then try again.') : e;
}

/** The whole body of `res`, each piece putting off the deadline `d`. */
async function bodyOf(res, d) {
  if (!res.body) return new Uint8Array(0);
  const chunks = [], reader = res.body.getReader();
  for (;;) {
    const {done, value} = await reader.read();
    if (done) return concat(chunks);
    chunks.push(value);
    d.putOff();
  }
}

/** The JSON body of `res` under the deadline `d`; null if it is not JSON, or was cut short. */
function jsonOf(res, d) {
  return bodyOf(res, d).then(body => JSON.parse(new TextDecoder().decode(body)))
    .catch(e => { if (e.name === 'AbortError') throw tooSlow(d, e); return null; });
}

/** The ApiError of a refusal (`res` not ok), in the server's own words (`data`, its JSON). */
function refusal(res, data) {
  let message = (data && data.detail) || `The server answered ${res.status} ${res.statusText}.`;
  const errors = Object.entries((data && data.errors) || {}).filter(([, v]) => !message.includes(v));
  if (errors.length) message += ' ' + errors.map(([k, v]) => `${k} ${v}.`).join(' ');   // e.g. "env must be ..."
  return new ApiError(res.status, message, data && data.errors);
}

/** JSON from /api/v1{path}; throws ApiError with the server's own sentence. */
async function api(path, {method = 'GET', body, auth = token, signal = view && view.signal} = {}) {
  const headers = {Authorization: `Token ${auth}`, Accept: 'application/json'};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const d = method === 'GET' ? readDeadline(signal) : {signal, putOff() {}, end() {}};
  let res, data;
  try {
    try {
      res = await fetch(API + path, {method, headers, signal: d.signal, cache: 'no-store',
                                     body: body === undefined ? undefined : JSON.stringify(body)});
    } catch (e) {
      if (e.name === 'AbortError') throw tooSlow(d, e);
      throw unreachable();
    }
    data = await jsonOf(res, d);
  } finally {
    d.end();
  }
  if (!res.ok) throw refusal(res, data);
  if (data !== null) return data;
  // Cut short, or a proxy's page (a sign-in form, say). A write was done all the same.
  throw new ApiError(0, method === 'GET'
    ? 'The server\'s answer was cut short, or was not buildserver\'s. Try again.'
    : 'The server said yes, but its answer was cut short, or was not buildserver\'s: ' +
      'reload the page to see what was done.');
}

/** What a page does when a request fails: sign out on 401, else say what went wrong. */
function fail(e, v) {
  if (e.name === 'AbortError' || (v && v.signal.aborted)) return;
  if (e.status === 401) return signOut(EXPIRED);
  const title = e.status === 404 ? 'Not found' : e.status === 403 ? 'Not allowed' : 'Something went wrong';
  show(h('div', {class: 'card'},
    h('h1', {tabindex: -1}, title), h('p', {class: 'error'}, e.message),
    h('p', {class: 'actions'}, h('button', {type: 'button', onclick: reload}, 'Try again'),
      h('a', {href: '#/'}, 'Your projects'))));
  focusHeading();
}

/** A refresh in the background: its success clears what a failed one said
 * (the server is back), a 401 signs out, and leaving the page says nothing. */
function refreshed(loading, v) {
  return loading.then(() => { if (!v.signal.aborted && refreshNotice) notify(''); }, e => {
    if (e.status === 401) return signOut(EXPIRED);
    if (e.name !== 'AbortError' && !v.signal.aborted) notify(e.message, true);
  });
}

// Sign-in, routing, page frame ------------------------------------------------

function newView(path) {
  if (view) { view.ctl.abort(); view.timers.forEach(clearInterval); }
  const ctl = new AbortController();
  view = {path, ctl, signal: ctl.signal, timers: [], update: null};
  notify('');
  return view;
}

/** Build the current page anew (not just its list). */
function reload() {
  if (view) view.path = null;
  route();
}

/** fn() every `ms` while the page is shown; not while the promise it gave
 * last is pending: refreshes would pile up behind one that stalls. */
function every(v, ms, fn) {
  let pending = null;
  v.timers.push(setInterval(() => {
    if (document.hidden || v.signal.aborted || pending) return;
    const p = fn();
    if (p) pending = p.finally(() => { pending = null; });
  }, ms));
}

function setCrumbs(items, title) {
  document.getElementById('crumbs').replaceChildren(...items.map(([text, href], i) =>
    h('li', {}, h('a', {href, 'aria-current': i === items.length - 1 ? 'page' : null}, text))));
  document.title = title ? `${title} · buildserver` : 'buildserver';
}

function focusHeading() {
  window.scrollTo(0, 0);
  const heading = main.querySelector('h1');
  if (heading) heading.focus({preventScroll: true});
}

/** Replace a container's content, keeping keyboard focus on the element with the same id. */
function swap(container, ...nodes) {
  const active = document.activeElement;
  const id = container.contains(active) ? active.id : null;
  container.replaceChildren(...nodes.flat(Infinity).filter(Boolean));
  if (id !== null) {
    const again = id && document.getElementById(id);
    (again || container.closest('section').querySelector('h2') || main.querySelector('h1')).focus({preventScroll: true});
  }
}

/** The sign-in form; `message` says why it shows (`info`: not an error). */
function showLogin(message, info) {
  newView(null);
  setCrumbs([]);
  document.getElementById('who').hidden = true;
  const input = h('input', {id: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false',
                            'aria-describedby': 'token-help', required: true});
  const error = h('p', {class: info ? 'info' : 'error', id: 'login-error', role: 'alert'}, message || '');
  const submit = h('button', {type: 'submit', class: 'primary'}, 'Sign in');
  const form = h('form', {class: 'card login', onsubmit: async e => {
    e.preventDefault();
    const value = input.value.trim();
    if (!/^[\x21-\x7e]+$/.test(value)) {
      error.textContent = 'Enter your token: one word of letters, digits, "-" and "_".';
      return input.focus();
    }
    submit.disabled = true;
    error.className = 'error';
    error.textContent = '';
    try {
      me = await api(ME_PATH, {auth: value, signal: null});
      token = value;
      saveToken(value);
      reload();
    } catch (err) {
      error.textContent = err.status === 401
        ? 'That token was not accepted. Check that you pasted all of it; an admin can make a new one with "python3 buildserver.py token NAME".'
        : err.message;
      input.focus();
    } finally {
      submit.disabled = false;
    }
  }},
    h('h1', {tabindex: -1}, 'Sign in'),
    h('label', {class: 'field', for: 'token'}, 'API token'), input,
    h('p', {class: 'hint', id: 'token-help'},
      'Printed once by ', h('code', {}, 'python3 buildserver.py adduser NAME'), ' (or ', h('code', {}, 'token NAME'),
      '); the admin\'s at the first start. This browser keeps it until you press "Forget token".'),
    error, h('div', {class: 'actions'}, submit));
  show(form);
  input.focus();
}

function signOut(message, info) {
  token = null;
  me = null;
  saveToken(null);
  showLogin(message, info);
}

function route() {
  if (!me) return;
  const [path, query = ''] = (location.hash.slice(1) || '/').split('?');
  const q = new URLSearchParams(query);
  if (view && view.path === path && view.update) return view.update(q);
  const v = newView(path);
  document.getElementById('who').hidden = false;
  document.getElementById('who-name').textContent = me.username + (me.is_admin ? ' (admin)' : '');
  const parts = path.split('/').filter(Boolean);
  if (!parts.every(p => NAME_RE.test(p)) || RESERVED.has(parts[0])) return notFound(v);
  if (parts.length <= 1) return projectsPage(v, parts[0] || me.username, q);
  if (parts.length === 2) return projectPage(v, parts[0], parts[1], q);
  if (parts.length === 4 && parts[2] === 'builds' && /^\d{1,18}$/.test(parts[3])) {
    return buildPage(v, parts[0], parts[1], parts[3]);
  }
  notFound(v);
}

function notFound(v) {
  setCrumbs([], 'Not found');
  show(h('div', {class: 'card'}, h('h1', {tabindex: -1}, 'Not found'),
    h('p', {}, 'There is no page at this address. ', h('a', {href: '#/'}, 'Go to your projects'), '.')));
  focusHeading();
}

function pager(hrefFor, offset, count, newer, older) {
  const last = Math.min(offset + PAGE, count);
  const lastPage = Math.max(0, Math.ceil(count / PAGE) - 1) * PAGE;  // (an old link may point past it)
  return h('nav', {class: 'pager', 'aria-label': 'Pages'},
    offset > 0 ? h('a', {id: 'page-prev', href: hrefFor(Math.max(0, Math.min(offset - PAGE, lastPage)))}, `← ${newer}`) : h('span'),
    h('span', {class: 'muted'}, !count ? '' : offset < count ? `${offset + 1}–${last} of ${count}` : `${count} in all`),
    last < count ? h('a', {id: 'page-next', href: hrefFor(offset + PAGE)}, `${older} →`) : h('span'));
}

function hashWith(path, params) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v)).toString();
  return `#${path}${query ? '?' + query : ''}`;
}

const offsetOf = q => Math.min(Math.max(0, parseInt(q.get('offset'), 10) || 0), Number.MAX_SAFE_INTEGER);  // (1e+23 is no offset)

// Projects --------------------------------------------------------------------

async function projectsPage(v, user, q) {
  const path = `/${user}`;
  setCrumbs([[user, `#${path}`]], user);
  const list = h('section', {'aria-label': 'Projects'});
  let seen = '', current = q, active = false, ticks = 0;

  async function load(query) {
    current = query;
    const offset = offsetOf(query);
    const data = await api(`${path}?limit=${PAGE}&offset=${offset}`).catch(e => { if (query === current) throw e; });
    if (query !== current) return;   // another page was asked for meanwhile: its answer (or failure) wins
    active = data.results.some(p => p.last_build && !FINAL.has(p.last_build.last_status));
    const key = JSON.stringify(data);
    if (key === seen) return;
    seen = key;
    swap(list, projectTable(user, data, offset),
         pager(o => hashWith(path, {offset: o}), offset, data.count, 'Previous', 'Next'));
  }

  try { await load(q); } catch (e) { return fail(e, v); }
  if (v.signal.aborted) return;
  v.update = query => refreshed(load(query), v);   // a failure says so, and keeps what was typed
  show(
    h('h1', {tabindex: -1}, user === me.username ? 'Your projects' : `Projects of ${user}`),
    me.is_admin ? namespaceForm(user) : null,
    newProjectForm(user), list);
  focusHeading();
  // Keep last-build statuses fresh: often while something runs, rarely otherwise.
  every(v, REFRESH_MS, () => active || ++ticks % 6 === 0 ? refreshed(load(current), v) : null);
}

function projectTable(user, data, offset) {
  if (!data.results.length) {
    return offset
      ? h('p', {}, 'No projects on this page. ', h('a', {href: `#/${user}`}, 'First page'))
      : h('p', {class: 'muted'}, 'No projects yet. Create one with "New project" above.');
  }
  return h('table', {class: 'list'},
    h('thead', {}, h('tr', {}, ['Project', 'Last build', 'Builds', 'Description'].map(t => h('th', {scope: 'col'}, t)))),
    h('tbody', {}, data.results.map(p => {
      const base = `#/${p.owner}/${p.name}`;
      const last = p.last_build;
      return h('tr', {},
        h('td', {'data-label': 'Project'}, h('a', {id: `project-${p.name}`, href: base}, p.name)),
        h('td', {'data-label': 'Last build'}, last
          ? [badge(last.last_status), ' ', h('a', {id: `last-${p.name}`, href: `${base}/builds/${last.id}`}, `#${last.id}`)]
          : h('span', {class: 'muted'}, 'none yet')),
        h('td', {'data-label': 'Builds'}, String(p.builds_count)),
        h('td', {'data-label': 'Description'}, p.description || h('span', {class: 'muted'}, '—')));
    })));
}

function namespaceForm(user) {
  const input = h('input', {type: 'text', id: 'namespace', value: user, pattern: NAME_PATTERN,
                            autocomplete: 'off', spellcheck: 'false'});
  return h('form', {class: 'inline', onsubmit: e => {
    e.preventDefault();
    if (NAME_RE.test(input.value.trim())) location.hash = `#/${input.value.trim()}`;
  }}, h('label', {for: 'namespace'}, 'Namespace'), input, h('button', {type: 'submit'}, 'Show'));
}

function newProjectForm(user) {
  const error = h('p', {class: 'error', role: 'alert'});
  const create = h('button', {type: 'submit', class: 'primary'}, 'Create project');
  const form = h('form', {onsubmit: async e => {
    e.preventDefault();
    const f = form.elements;
    const body = {name: f.name.value.trim()};
    if (f.command.value.trim()) body.command = f.command.value;
    if (f.description.value.trim()) body.description = f.description.value.trim();
    error.textContent = '';
    create.disabled = true;   // a double click made it twice: the second said it was taken
    try {
      await api(`/${user}`, {method: 'POST', body});
      location.hash = `#/${user}/${body.name}`;
    } catch (err) {
      if (err.status === 401) return signOut(EXPIRED);
      if (err.name !== 'AbortError') error.textContent = err.message;
    } finally {
      create.disabled = false;
    }
  }},
    h('label', {class: 'field', for: 'np-name'}, 'Name'),
    h('input', {type: 'text', id: 'np-name', name: 'name', required: true, pattern: NAME_PATTERN,
                autocomplete: 'off', 'aria-describedby': 'np-name-help'}),
    h('p', {class: 'hint', id: 'np-name-help'}, 'Letters, digits, "-" and "_".'),
    h('label', {class: 'field', for: 'np-command'}, 'Default command'),
    h('textarea', {id: 'np-command', name: 'command', rows: 2, placeholder: 'make test'}),
    h('label', {class: 'field', for: 'np-description'}, 'Description'),
    h('input', {type: 'text', id: 'np-description', name: 'description'}),
    error, h('div', {class: 'actions'}, create));
  return h('details', {class: 'more card'}, h('summary', {}, 'New project'), form);
}

// One project and its builds --------------------------------------------------

async function projectPage(v, user, name, q) {
  const path = `/${user}/${name}`;
  setCrumbs([[user, `#/${user}`], [name, `#${path}`]], `${name} · ${user}`);
  const list = h('div');
  const boxes = STATUSES.map(s => h('input', {type: 'checkbox', id: `filter-${s}`, value: s, onchange: () => {
    const chosen = boxes.filter(b => b.checked).map(b => b.value).join(',');
    location.hash = hashWith(path, {status: chosen});
  }}));
  const filter = h('fieldset', {class: 'filter'}, h('legend', {}, 'Status'),
    boxes.map((box, i) => h('label', {class: `chip st-${STATUSES[i]}`}, box, sym(STATUSES[i]), STATUSES[i])));
  let seen = '', current = q, active = false, ticks = 0, project;

  async function load(query) {
    current = query;
    const offset = offsetOf(query);
    const statuses = (query.get('status') || '').split(',').filter(s => STATUSES.includes(s));
    boxes.forEach(b => { b.checked = statuses.includes(b.value); });
    const url = `${path}/builds?limit=${PAGE}&offset=${offset}` + (statuses.length ? `&status=${statuses.join(',')}` : '');
    const data = await api(url).catch(e => { if (query === current) throw e; });
    if (query !== current) return;   // another page or filter was asked for meanwhile: its answer (or failure) wins
    active = data.results.some(b => !FINAL.has(b.last_status));
    const key = JSON.stringify(data);
    if (key === seen) return;
    seen = key;
    swap(list, buildTable(path, data, offset, statuses),
         pager(o => hashWith(path, {status: statuses.join(','), offset: o}), offset, data.count, 'Newer', 'Older'));
  }

  try { [project] = await Promise.all([api(path), load(q)]); } catch (e) { return fail(e, v); }
  if (v.signal.aborted) return;
  v.update = query => refreshed(load(query), v);   // a failure says so, and keeps what was typed
  show(
    h('h1', {tabindex: -1}, project.name),
    project.description ? h('p', {class: 'muted'}, project.description) : null,
    h('div', {class: 'card'},
      h('dl', {class: 'fields'},
        h('dt', {}, 'Command'), h('dd', {}, project.command ? codeBlock(project.command) : h('span', {class: 'muted'}, 'none: give one per build')),
        h('dt', {}, 'Timeout'), h('dd', {}, project.timeout ? duration(project.timeout) : 'none'),
        Object.keys(project.env).length ? [h('dt', {}, 'Environment'), h('dd', {}, envBlock(project.env))] : null),
      triggerForm(path, project)),
    h('section', {'aria-labelledby': 'builds-h'}, h('h2', {id: 'builds-h', tabindex: -1}, 'Builds'), filter, list));
  focusHeading();
  every(v, REFRESH_MS, () => active || ++ticks % 6 === 0 ? refreshed(load(current), v) : null);
}

function envBlock(env) {
  const lines = Object.entries(env).map(([k, val]) => `${k}=${val}`).join('\n');
  return h('details', {}, h('summary', {}, `${Object.keys(env).length} variable(s)`), codeBlock(lines));
}

// Shell text as it will run (bidirectional controls shown, not obeyed, as all text: see h).
function codeBlock(text) { return h('pre', {class: 'cmd'}, text); }

function buildTable(path, data, offset, statuses) {
  if (!data.results.length) {
    if (offset) return h('p', {}, 'No builds on this page. ', h('a', {href: hashWith(path, {status: statuses.join(',')})}, 'First page'));
    return h('p', {class: 'muted'}, statuses.length ? 'No builds with this status.' : 'No builds yet: trigger one above.');
  }
  return h('table', {class: 'list builds'},
    h('thead', {}, h('tr', {}, ['Status', 'Build', 'Name', 'Tags', 'By', 'Created', 'Duration'].map(t => h('th', {scope: 'col'}, t)))),
    h('tbody', {}, data.results.map(b => h('tr', {},
      h('td', {'data-label': 'Status'}, badge(b.last_status)),
      h('td', {'data-label': 'Build'}, h('a', {id: `build-${b.id}`, href: `#${path}/builds/${b.id}`}, `#${b.id}`),
        b.bookmarked ? h('span', {class: 'mark', title: 'bookmarked'}, ' ★', h('span', {class: 'vh'}, ' (bookmarked)')) : null),
      h('td', {'data-label': 'Name'}, b.name || h('span', {class: 'muted'}, '—')),
      h('td', {'data-label': 'Tags'}, tags(b.tags)),
      h('td', {'data-label': 'By'}, b.user),
      h('td', {'data-label': 'Created'}, when(b.created_at)),
      h('td', {'data-label': 'Duration', class: 'num'}, duration(b.duration))))));
}

function triggerForm(path, project) {
  const error = h('p', {class: 'error', role: 'alert'});
  const form = h('form', {onsubmit: async e => {
    e.preventDefault();
    const f = form.elements;
    const body = {};
    if (f.command.value.trim()) body.command = f.command.value;
    const env = {};
    for (const [i, line] of f.env.value.split('\n').entries()) {
      if (!line.trim()) continue;
      const eq = line.indexOf('=');
      const key = line.slice(0, eq).trim();
      if (eq < 0 || !/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) {
        error.textContent = `Environment, line ${i + 1}: write NAME=value, the name in letters, digits and "_".`;
        return f.env.focus();
      }
      env[key] = line.slice(eq + 1);
    }
    if (Object.keys(env).length) body.env = env;
    if (f.name.value.trim()) body.name = f.name.value.trim();
    const tagList = f.tags.value.split(',').map(t => t.trim()).filter(Boolean);
    if (tagList.length) body.tags = tagList;
    error.textContent = '';
    f.go.disabled = true;
    try {
      const build = await api(`${path}/builds`, {method: 'POST', body});
      location.hash = `#${path}/builds/${build.id}`;
    } catch (err) {
      if (err.status === 401) return signOut(EXPIRED);
      if (err.name !== 'AbortError') error.textContent = err.message;
    } finally {
      f.go.disabled = false;
    }
  }},
    h('div', {class: 'actions'}, h('button', {type: 'submit', name: 'go', class: 'primary'}, sym('running'), ' Trigger build')),
    h('details', {class: 'more'}, h('summary', {}, 'Options: command, environment, name, tags'),
      h('label', {class: 'field', for: 'tb-command'}, 'Command'),
      h('textarea', {id: 'tb-command', name: 'command', rows: 2, placeholder: project.command || 'the shell command to run',
                     'aria-describedby': 'tb-command-help'}),
      h('p', {class: 'hint', id: 'tb-command-help'}, 'Empty: the project\'s command.'),
      h('label', {class: 'field', for: 'tb-env'}, 'Environment'),
      h('textarea', {id: 'tb-env', name: 'env', rows: 3, placeholder: 'NAME=value, one per line', spellcheck: 'false',
                     'aria-describedby': 'tb-env-help'}),
      h('p', {class: 'hint', id: 'tb-env-help'}, 'Added to the project\'s environment; these win.'),
      h('label', {class: 'field', for: 'tb-name'}, 'Name'),
      h('input', {type: 'text', id: 'tb-name', name: 'name', autocomplete: 'off', pattern: BUILD_NAME_PATTERN,
                  'aria-describedby': 'tb-name-help'}),
      h('p', {class: 'hint', id: 'tb-name-help'}, 'Letters, digits, "-" and "_".'),
      h('label', {class: 'field', for: 'tb-tags'}, 'Tags'),
      h('input', {type: 'text', id: 'tb-tags', name: 'tags', autocomplete: 'off', placeholder: 'nightly, release'})),
    error);
  return form;
}

// One build -------------------------------------------------------------------

async function buildPage(v, user, name, id) {
  const path = `/${user}/${name}/builds/${id}`;
  setCrumbs([[user, `#/${user}`], [name, `#/${user}/${name}`], [`#${id}`, `#${path}`]], `#${id} · ${name}`);
  let build, statuses, code;
  try {
    [build, statuses, code] = await Promise.all([api(path), api(`${path}/statuses?limit=1000`).then(r => r.results),
                                                 api(`${path}/coderef`)]);
  } catch (e) { return fail(e, v); }
  if (v.signal.aborted) return;

  const status = h('span', {id: 'status', 'aria-live': 'polite'});
  const stop = h('button', {type: 'button', id: 'stop', class: 'danger', onclick: stopBuild}, sym('stopped'), ' Stop');
  const restart = h('button', {type: 'button', id: 'restart', onclick: restartBuild}, h('span', {'aria-hidden': 'true'}, '↻'), ' Restart');
  const mark = h('button', {type: 'button', id: 'bookmark', onclick: toggleBookmark});
  const fields = h('dl', {class: 'fields'});
  const history = h('div');
  const log = new LogView(v, path);
  log.onOutput = () => { if (build.last_status === 'created' || build.last_status === 'scheduled') refresh(); };
  log.onEnd = refresh;

  let shown = '', shownStatuses = 0, clock = {at: performance.now(), duration: build.duration};
  function render() {
    const s = build.last_status;
    status.replaceChildren(badge(s));
    stop.disabled = !STOPPABLE.has(s);
    restart.disabled = !FINAL.has(s);
    mark.setAttribute('aria-pressed', String(build.bookmarked));
    mark.replaceChildren(h('span', {'aria-hidden': 'true'}, build.bookmarked ? '★' : '☆'),
                         build.bookmarked ? ' Bookmarked' : ' Bookmark');
    clock = {at: performance.now(), duration: build.duration};
    if (statuses.length !== shownStatuses) {
      shownStatuses = statuses.length;
      history.replaceChildren(timeline(statuses));
    }
    // Rebuilt only when more than the clock and the log's size changed (keeps open <details> open).
    const key = JSON.stringify({...build, duration: 0, log_size: 0, updated_at: 0});
    if (key === shown) {
      document.getElementById('duration').textContent = duration(build.duration);
      document.getElementById('log-size').textContent = bytes(build.log_size);
      return;
    }
    shown = key;
    const rows = [
      ['Name', build.name || '—'], ['Tags', tags(build.tags)], ['Triggered by', build.user],
      ['Created', when(build.created_at, true)], ['Started', when(build.started_at, true)],
      ['Finished', when(build.finished_at, true)],
      ['Duration', h('span', {id: 'duration'}, duration(build.duration))],
      ['Exit code', build.exit_code == null ? '—' : String(build.exit_code)],
      ['Timeout', build.timeout ? duration(build.timeout) : 'none'],
      build.restarted_from ? ['Restarted from', h('a', {id: 'restarted-from', href: `#/${user}/${name}/builds/${build.restarted_from}`}, `#${build.restarted_from}`)] : null,
      build.is_managed ? null : ['Runs', 'elsewhere (unmanaged)'],
      build.description ? ['Description', build.description] : null,
      codeRow(code),
      ['Command', build.command ? codeBlock(build.command) : '—'],
      Object.keys(build.env).length ? ['Environment', envBlock(build.env)] : null,
      ['Log', [h('span', {id: 'log-size'}, bytes(build.log_size)), build.truncated ? ' (truncated: the server\'s limit was reached)' : '']],
    ];
    swap(fields, rows.filter(Boolean).map(([k, val]) => [h('dt', {}, k), h('dd', {}, val)]));
  }

  let inflight = null;
  function refresh() {
    if (!inflight) {
      let got = null;
      inflight = refreshed(Promise.all([api(path), api(`${path}/statuses?limit=1000`)])
        .then(([b, s]) => { build = got = b; statuses = s.results; render(); log.sized(b.log_size); }, gone), v)
        .then(() => got)
        .finally(() => { inflight = null; });
    }
    return inflight;
  }

  /** Deleted meanwhile (a 404): nothing more to ask about it, or to do to it. */
  function gone(e) {
    if (e.status !== 404) throw e;   // (said by refreshed)
    v.ctl.abort();   // the log's follow and the refreshes end
    stop.disabled = restart.disabled = mark.disabled = true;
    status.replaceChildren(h('span', {class: 'muted'}, 'deleted'));
    notify(e.message);
  }

  async function stopBuild() {
    stop.disabled = true;
    status.replaceChildren(badge('stopping'));   // the answer waits up to 2 s for the build to end
    try {
      build = await api(`${path}/stop`, {method: 'POST'});
      notify('');   // what a failed try said is past
      render();
      refresh();
    } catch (e) {
      if (e.status === 401) return signOut(EXPIRED);
      if (e.status === 404) return gone(e);   // (its page saw it end, not go)
      if (e.name !== 'AbortError') { notify(`Could not stop the build: ${e.message}`); render(); }
    }
    refocus(stop, restart, log.pre);
  }

  async function toggleBookmark() {
    mark.disabled = true;
    try {
      build = await (build.bookmarked ? api(`${path}/unbookmark`, {method: 'DELETE'})
                                      : api(`${path}/bookmark`, {method: 'POST'}));
      notify('');   // what a failed try said is past
      render();
    } catch (e) {
      if (e.status === 401) return signOut(EXPIRED);
      if (e.status === 404) return gone(e);
      if (e.name !== 'AbortError') notify(`Could not change the bookmark: ${e.message}`);
    } finally {
      mark.disabled = v.signal.aborted;   // (gone, or left)
      refocus(mark);
    }
  }

  async function restartBuild() {
    restart.disabled = true;
    try {
      const next = await api(`${path}/restart`, {method: 'POST'});
      location.hash = `#/${user}/${name}/builds/${next.id}`;
    } catch (e) {
      if (e.status === 401) return signOut(EXPIRED);
      if (e.status === 404) return gone(e);
      if (e.name !== 'AbortError') { notify(`Could not restart the build: ${e.message}`); render(); refocus(restart, stop, log.pre); }
    }
  }

  show(
    h('div', {class: 'head'}, h('h1', {tabindex: -1}, `Build #${build.id}`), status),
    h('p', {class: 'muted'}, 'of ', h('a', {href: `#/${user}/${name}`}, `${user}/${name}`),
      build.name ? ` · ${build.name}` : ''),
    h('div', {class: 'actions'}, stop, restart, mark),
    h('div', {class: 'cols'},
      h('section', {class: 'card', 'aria-labelledby': 'fields-h'}, h('h2', {id: 'fields-h', class: 'vh'}, 'Details'), fields),
      h('section', {class: 'card', 'aria-labelledby': 'history-h'}, h('h2', {id: 'history-h'}, 'History'), history)),
    log.element);
  render();
  focusHeading();

  every(v, REFRESH_MS, () => FINAL.has(build.last_status) ? null : refresh());
  every(v, 1000, () => {   // the running clock: the server's duration plus the time since (no request)
    if (build.started_at && !build.finished_at && clock.duration != null) {
      document.getElementById('duration').textContent = duration(clock.duration + (performance.now() - clock.at) / 1000);
    }
  });
  // A log the server could not send (away, or stalled) is asked for again,
  // less often as it goes on, until it comes: the pane has no button to ask.
  let note, said;
  for (let pause = 1000; !v.signal.aborted; pause = Math.min(2 * pause, 30000)) {
    try {
      const whole = await log.load(build);
      if (note) log.unsay(note);
      if (!whole) log.follow();
      else if (!FINAL.has(build.last_status)) refresh();   // it ended as the page opened
      return;
    } catch (e) {
      if (e.status === 401) return signOut(EXPIRED);
      if (e.status === 404) return gone(e);
      if (e.name === 'AbortError' || v.signal.aborted) break;
      said = `The log could not be loaded: ${e.message}`;
      const again = e.status === 0 || e.status >= 500;
      note = log.say(again ? `${said} (The page tries again by itself.)` : said, note);
      if (!again) return;
      await sleep(pause, v.signal);
    }
  }
  if (note) log.say(said, note);   // no more tries: the build was deleted meanwhile, say
}

// The code a build was made from, as a script recorded it (POST .../coderef), or no row.
function codeRow(code) {
  if (!code.commit && !code.head && !code.branch && !code.git_url) return null;
  const commit = code.commit || code.head;
  return ['Code', [
    code.branch || '', code.branch && commit ? ' @ ' : '', commit ? h('code', {}, commit.slice(0, 12)) : '',
    code.is_dirty ? ' (with uncommitted changes)' : '',
    code.git_url ? [h('br'), h('span', {class: 'muted'}, code.git_url)] : ''].filter(Boolean)];
}

function timeline(statuses) {
  let previous = null;
  return h('ol', {class: 'timeline'}, statuses.map(s => {
    const t = parseTime(s.created_at);
    const step = previous ? ` +${duration((t - previous) / 1000)}` : '';
    previous = t;
    return h('li', {class: `st-${s.status}`},
      h('span', {class: 'dot', 'aria-hidden': 'true'}, SYMBOL[s.status] || '?'),
      h('strong', {}, s.status), ' ',
      h('time', {datetime: s.created_at, title: t.toLocaleString()}, t.toLocaleTimeString()),
      h('span', {class: 'muted'}, step),
      s.message ? h('div', {class: 'msg'}, s.message) : null);
  }));
}

// The log ---------------------------------------------------------------------
// The page holds bytes [start, end) of the log: the tail at first, then what the
// follow stream brings; "Load earlier" prepends the LOG_PAGE bytes before `start`.
// Whole lines go into groups of small blocks that the browser lays out only when
// they are on screen (content-visibility), so a long log stays fast; the line
// still being written is redrawn as it grows, but for one past 64 KiB: that is
// drawn as it comes, in pieces (inline blocks, laid out once each: with
// wrapping off they read as one line, with it on each starts a row, until a
// reload; a "\r" that writes the line again empties them). While the reader
// follows the end (see following), at most LOG_KEEP bytes stay in the page. A reader scrolled up keeps what they
// read: the page grows to LOG_HOLD bytes, then holds newer output back undrawn
// (its last LOG_KEEP bytes or so) until they come back down, when it replaces the page.

class LogView {
  constructor(v, path) {
    this.v = v;
    this.path = path;
    this.start = 0;                // log offset of the first byte in the page
    this.end = 0;                  // log offset after the last byte received
    this.shown = 0;                // bytes in the groups
    this.groups = [];              // [{el, bytes, open}], oldest first; open: a piece of a line not ended
    this.pending = [];             // bytes received, not drawn yet
    this.open = new Uint8Array(0); // the last line, until its newline comes
    this.held = false;             // output waits in `pending` while the reader is up the page
    this.pinned = true;            // following the end, until the reader scrolls up (see scrolled)
    this.lastTop = 0;              // scrollTop when last seen
    this.growth = new ResizeObserver(() => { if (this.pinned && !this.atBottom()) this.toBottom(); });
    this.ansi = ansiState();
    this.onOutput = this.onEnd = () => null;
    this.stream = null;            // the follow's AbortController while it is open (see sized)
    this.pre = h('pre', {class: 'logbox', id: 'log', tabindex: 0, 'aria-label': 'Build log', onscroll: () => this.scrolled(),
                         onkeydown: (e) => this.keyed(e)});
    this.empty = h('span', {class: 'note'}, 'No output yet.');
    this.openEl = h('span', {class: 'open'});   // an inline block: it continues a line in pieces
    this.pre.append(this.empty, this.openEl);
    this.growth.observe(this.pre);   // a box made shorter (the window) leaves a follower short too
    this.live = h('span', {class: 'live', id: 'live', hidden: true}, 'live');
    this.earlierBtn = h('button', {type: 'button', id: 'earlier', class: 'small', hidden: true, onclick: () => this.earlier()});
    this.latestBtn = h('button', {type: 'button', id: 'latest', class: 'small', hidden: true, onclick: () => {
      this.toBottom();
      this.pre.focus({preventScroll: true});
    }});
    const wrap = h('input', {type: 'checkbox', id: 'wrap', checked: true, onchange: () => {
      const following = this.following(), read = following ? null : this.readAt();
      this.pre.classList.toggle('nowrap', !wrap.checked);
      if (following) this.toBottom();
      else if (read) this.keepInView(...read);   // (text made shorter can leave the view past its end)
    }});
    this.element = h('section', {'aria-labelledby': 'log-h'},
      h('div', {class: 'loghead'}, h('h2', {id: 'log-h'}, 'Log'), this.live,
        h('div', {class: 'opts'}, h('label', {}, wrap, ' Wrap lines'))),
      this.earlierBtn, h('div', {class: 'logwrap'}, this.pre, this.latestBtn));
  }

  atBottom() {
    const b = this.pre;
    return b.scrollHeight - b.scrollTop - b.clientHeight < 40;
  }

  /** At the end, or taken there and not scrolled up since: a block drawn
   * there may have grown past its estimate (wrapped lines), leaving it short. */
  following() { return this.pinned || this.atBottom(); }

  toBottom() {
    this.pre.scrollTop = this.pre.scrollHeight;
    this.pinned = true;
    this.lastTop = this.pre.scrollTop;
  }

  /** End follows the end at once: the browser's own End scrolls there over
   * a moment, to where the end was, and output arriving meanwhile left the
   * reader short of it, not following. */
  keyed(e) {
    if (e.key !== 'End' || e.shiftKey || e.altKey || e.metaKey) return;
    e.preventDefault();
    this.toBottom();
  }

  /** The reader scrolled (or the browser did, keeping what they read in view). */
  scrolled() {
    const top = this.pre.scrollTop;
    if (this.atBottom()) this.pinned = true;
    else if (top < this.lastTop - 2) this.pinned = false;   // up: reading (not a box made shorter)
    this.lastTop = top;
    this.controls();
  }

  /** The character at the top left of the box, and how far down the box it is (or null). */
  readAt() {
    const box = this.pre.getBoundingClientRect();
    const at = caretAt(box.left + 8, box.top + 8);
    return at && this.pre.contains(at.startContainer) ? [at, at.getBoundingClientRect().top - box.top] : null;
  }

  /** Scroll the character of `range` back to `down` pixels below the box's top. */
  keepInView(range, down) {
    this.pre.scrollTop += range.getBoundingClientRect().top - this.pre.getBoundingClientRect().top - down;
    this.lastTop = this.pre.scrollTop;
  }

  /** Follow the last group as it is drawn: it may grow past its estimate. */
  watchEnd(el) {
    if (this.watched) this.growth.unobserve(this.watched);
    this.growth.observe(this.watched = el);
  }

  /** A note in the log (`note`: one said before, said anew in its place). */
  say(text, note = h('span', {class: 'note'})) {
    note.textContent = `\n${text}\n`;
    if (!note.isConnected) this.pre.append(note);
    this.empty.hidden = true;   // (not known to be none)
    return note;
  }

  unsay(note) {
    note.remove();
    this.empty.hidden = false;
  }

  /** Show the last LOG_PAGE bytes; returns whether that is the whole, final log. */
  async load(build) {
    const from = Math.max(0, build.log_size - LOG_PAGE);
    const page = await api(`${this.path}/logs?format=json&offset=${from}&limit=${LOG_PAGE}`);
    if (!page.complete && !page.text.includes('\n')) {   // a line still being written: the stream brings it
      this.start = this.end = await charStart(this.path, page.offset);
      return false;
    }
    const [skip, text] = page.offset > 0 ? await dropPartialLine(page.text, this.path, page.offset)
                                         : [0, page.text];
    this.start = page.offset + skip;
    this.end = page.next_offset;
    this.addGroup(text, this.end - this.start, this.ansi, null);
    this.toBottom();
    this.controls();
    return page.complete;
  }

  /** Stream new output (GET .../logs?follow=1) until the build is final; not
   * while the tab is hidden: a browser opens six connections to a server, and
   * six followed logs would leave none for any other request of its tabs. */
  async follow() {
    const signal = this.v.signal;
    let pause = 0;
    while (!signal.aborted) {
      await visible(signal);
      const before = this.end;
      let retryAfter = 0;
      const stream = this.stream = new AbortController();
      this.heard = performance.now();
      const end = () => { if (document.hidden || signal.aborted) stream.abort(); };
      document.addEventListener('visibilitychange', end);
      signal.addEventListener('abort', end);
      try {
        const res = await fetch(`${API}${this.path}/logs?follow=1&offset=${this.end}`, {
          signal: stream.signal, cache: 'no-store',
          headers: {Authorization: `Token ${token}`, Accept: 'text/plain'}});
        if (res.status === 401) return signOut(EXPIRED);
        if (res.status === 403 || res.status === 404) return this.setLive('off');   // gone, or not ours
        if (res.ok) {
          this.setLive('live');
          const reader = res.body.getReader();
          for (;;) {
            const {done, value} = await reader.read();
            if (done) break;
            this.heard = performance.now();
            this.end += value.length;
            this.add(value);
            this.onOutput();
          }
        } else {
          retryAfter = parseInt(res.headers.get('Retry-After'), 10) || 0;   // 503: too many followers
          await res.body.cancel();
        }
      } catch (e) {
        if (signal.aborted) return;   // left the page; otherwise hidden, or the connection broke
      } finally {
        document.removeEventListener('visibilitychange', end);
        signal.removeEventListener('abort', end);
        this.stream = null;
        clearTimeout(this.stuck);
      }
      this.setLive('wait');
      const build = await this.onEnd();
      if (signal.aborted) return;
      if (build && FINAL.has(build.last_status) && this.end >= build.log_size) {
        this.flush();
        return this.setLive('off');
      }
      pause = this.end > before ? 0 : Math.min(Math.max(pause * 2, 500, retryAfter * 1000), 10000);
      await sleep(pause, signal);
    }
  }

  /** A refresh read the log's `size`: a follow that has brought nothing for
   * READ_MS while the server has more is stuck (held by a proxy, or its
   * connection dropped without a word), and is opened again. A quiet
   * build's follow is never cut: it has nothing to bring. */
  sized(size) {
    clearTimeout(this.stuck);
    if (!this.stream || size <= this.end) return;
    const wait = this.heard + READ_MS - performance.now();
    if (wait <= 0) this.stream.abort();
    else this.stuck = setTimeout(() => this.sized(size), wait);
  }

  setLive(state) {
    this.live.hidden = state === 'off';
    this.live.textContent = state === 'live' ? 'live' : 'reconnecting…';
  }

  add(bytes) {
    this.pending.push(bytes);
    if (!this.scheduled) {
      this.scheduled = true;
      if (document.hidden) setTimeout(() => this.flush(), 250); else requestAnimationFrame(() => this.flush());
    }
  }

  /** Draw what arrived since the last frame: one DOM change per frame, however fast the log. */
  flush() {
    this.scheduled = false;
    if (!this.pending.length) return;
    const follow = !this.groups.length || this.following();
    if (!follow && (this.held || this.shown + this.waiting() > LOG_HOLD)) return this.hold();
    let raw = concat([this.open, ...this.pending]);
    this.pending = [];
    if (follow && raw.length > LOG_KEEP) {   // more than the page keeps, at once: skip to the last lines
      const skip = raw.indexOf(10, raw.length - LOG_KEEP) + 1 || raw.length - LOG_KEEP;
      ansiNodes(new TextDecoder().decode(raw.subarray(0, skip)), this.ansi, false);
      this.groups.forEach(g => g.el.remove());
      this.groups = [];
      this.shown = 0;
      this.start = this.end - (raw.length - skip);
      raw = raw.subarray(skip);
    }
    const lines = raw.lastIndexOf(10) + 1;   // whole lines (a newline byte never sits inside a character)
    const cut = raw.length - lines > 64 * 1024 ? charBoundary(raw) : lines;   // a huge line: draw what there is
    let at = 0;
    const draw = (to, piece) => {   // raw's bytes [at, to): whole lines, or a piece of a huge line
      if (to <= at) return;
      const text = new TextDecoder().decode(raw.subarray(at, to));
      if (piece) this.addPiece(text, to - at); else this.addGroup(text, to - at, this.ansi, null);
      at = to;
    };
    const last = this.groups[this.groups.length - 1];
    if (last && last.open) {   // the line drawn in pieces goes on
      const end = raw.indexOf(10) + 1 || raw.length;
      if (rewritesLine(this.ansi.carry + new TextDecoder().decode(raw.subarray(0, end), {stream: true}))) {
        for (let i = this.groups.length - 1; i >= 0 && this.groups[i].open; i--) this.groups[i].el.replaceChildren();
      }
      draw(Math.min(end, cut), true);
    }
    draw(lines, false);
    draw(cut, true);
    this.open = raw.slice(cut);
    this.openEl.replaceChildren(ansiNodes(new TextDecoder().decode(this.open, {stream: true}), {...this.ansi}, true));
    if (follow) {
      // Whole groups go, oldest first, while the rest holds LOG_KEEP: one drawn
      // after a skip can hold as much alone, and the page would keep a frame's worth.
      while (this.groups.length > 1 && this.shown - this.groups[0].bytes >= LOG_KEEP) {
        const old = this.groups.shift();
        old.el.remove();
        this.shown -= old.bytes;
        this.start += old.bytes;
      }
      this.toBottom();
    }
    this.controls();
  }

  waiting() { return this.open.length + this.pending.reduce((n, p) => n + p.length, 0); }

  /** Keep the output that arrives while the reader is up a full page, undrawn:
   *  only its last lines once it outgrows twice what a followed page keeps. */
  hold() {
    this.held = true;
    if (this.waiting() > 2 * LOG_KEEP) {
      const raw = concat([this.open, ...this.pending]);
      const skip = raw.indexOf(10, raw.length - LOG_KEEP) + 1 || raw.length - LOG_KEEP;
      ansiNodes(new TextDecoder().decode(raw.subarray(0, skip)), this.ansi, false);
      this.open = new Uint8Array(0);
      this.pending = [raw.slice(skip)];
    }
    this.controls();
  }

  /** Back at the bottom after a hold: the output held back replaces the page. */
  release() {
    this.held = false;
    this.groups.forEach(g => g.el.remove());
    this.groups = [];
    this.shown = 0;
    this.start = this.end - this.waiting();
    this.flush();
  }

  /** A piece of a huge line, at the end: an inline block, continuing the pieces before it. */
  addPiece(text, bytes) {
    const el = h('span', {class: 'piece'}, ansiNodes(text, this.ansi, true));
    this.pre.insertBefore(el, this.openEl);
    this.groups.push({el, bytes, open: !text.endsWith('\n')});
    this.watchEnd(el);
    this.shown += bytes;
  }

  /** Lines of text as a group of blocks of at most 200 lines, before `next` (null: at the end). */
  addGroup(text, bytes, state, next) {
    const el = h('div');
    for (let from = 0; from < text.length;) {
      let to = from, lines = 0;
      while (lines < 200 && to - from < 16384 && to < text.length) {
        const nl = text.indexOf('\n', to);
        to = nl < 0 ? text.length : nl + 1;
        lines++;
      }
      const block = h('div', {class: 'lines'}, ansiNodes(text.slice(from, to), state, true));
      block.style.containIntrinsicSize = `auto ${(lines * 1.45).toFixed(2)}em`;
      el.append(block);
      from = to;
    }
    const group = {el, bytes};
    if (next) {
      this.pre.insertBefore(el, next.el);
      this.groups.unshift(group);
    } else {
      this.pre.insertBefore(el, this.openEl);
      this.groups.push(group);
      this.watchEnd(el);
    }
    this.shown += bytes;
  }

  controls() {
    if (this.held && this.atBottom()) return this.release();
    if (this.end > 0) this.empty.remove();
    this.earlierBtn.hidden = this.start <= 0;
    this.earlierBtn.textContent = `↑ Load earlier output (${bytes(this.start)} not shown)`;
    this.latestBtn.hidden = this.following();
    this.latestBtn.textContent = this.held ? `↓ Latest output (${bytes(this.end - this.start - this.shown)} more)`
                                           : '↓ Latest output';
  }

  /** Prepend the LOG_PAGE bytes before `start`, keeping what the reader sees in place. */
  async earlier() {
    const end = this.start, following = this.following();
    this.earlierBtn.disabled = true;
    if (following) {   // up to the page's start, where the text joins: a page that follows drops it
      this.pinned = false;
      this.pre.scrollTop = this.lastTop = 0;
      this.controls();
    }
    let joined = false;
    try {
      const from = await charStart(this.path, end - LOG_PAGE);
      let text = '', pos = from;
      while (pos < end) {   // a running build's page stops at a line's end: fetch the rest
        const page = await api(`${this.path}/logs?format=json&offset=${pos}&limit=${end - pos}`);
        if (page.next_offset <= pos) break;
        text += page.text;
        pos = page.next_offset;
      }
      const [skip, rest] = from > 0 ? await dropPartialLine(text, this.path, from) : [0, text];
      notify('');   // what a failed try said is past
      joined = this.start === end;   // (else the reader came down meanwhile and the page was replaced)
      if (joined) this.prepend(rest, from + skip);
    } catch (e) {
      if (e.status === 401) return signOut(EXPIRED);
      if (e.name !== 'AbortError') notify(`Could not load earlier output: ${e.message}`);
    } finally {
      this.earlierBtn.disabled = false;
      if (!joined && following && this.pre.scrollTop === 0) this.toBottom();   // a follower follows on
    }
    this.controls();
    refocus(this.earlierBtn, this.pre);   // (disabled, it lost the focus: again, or read on)
  }

  /** Put the text of the log from `start` to the page's start above it,
   * keeping what the reader sees in place (a follower taken up by the click:
   * the join, at the top). The new text's height is an estimate until the
   * browser draws what is near the view, a frame or more later (on a busy
   * machine, later than a look two frames on), and wrapped lines are taller:
   * so the text next to the join is drawn at once, and what was read is put
   * back in the same step. */
  prepend(text, start) {
    const read = this.readAt(), fromBottom = this.pre.scrollHeight - this.pre.scrollTop;
    this.addGroup(text, this.start - start, ansiState(), this.groups[0] || {el: this.openEl});
    this.start = start;
    this.pre.scrollTop = this.lastTop = this.pre.scrollHeight - fromBottom;
    if (!read) return;
    drawLast(this.groups[0].el, 2 * window.innerHeight);
    this.keepInView(...read);
  }
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** Where `raw` can be cut without splitting a UTF-8 character at its end. */
function charBoundary(raw) {
  const cut = raw.length;
  let back = 0;
  while (back < 3 && cut - back > 0 && (raw[cut - back - 1] & 0xc0) === 0x80) back++;
  const lead = cut - back - 1;   // where the last character begins, if one does there
  if (lead < 0 || raw[lead] < 0xc0) return cut;   // continuation bytes of none: strays
  // Cut before it only if it is not whole yet (what follows a whole one is strays).
  return lead + (raw[lead] >= 0xf0 ? 4 : raw[lead] >= 0xe0 ? 3 : 2) > cut ? lead : cut;
}

/** [bytes, rest]: a page of the log at `path` from byte `from` that starts
 *  inside a line drops that partial line (whole lines only), unless it is all
 *  the page holds (a line longer than a page). */
async function dropPartialLine(text, path, from) {
  const nl = text.indexOf('\n');
  if (nl < 0 || nl === text.length - 1) return [0, text];
  let head = text.slice(0, nl + 1), replaced = 0;
  // A page cut inside a character starts with one U+FFFD per stray byte (at most 3).
  while (replaced < 3 && head[replaced] === '\ufffd') replaced++;
  head = head.slice(replaced);
  let skip = replaced + new TextEncoder().encode(head).length;
  if (head.includes('\ufffd')) {   // bytes that are not UTF-8, 1 to 3 a U+FFFD: count them as stored
    const raw = await logBytes(path, from, skip);
    if (raw.indexOf(10) >= 0) skip = raw.indexOf(10) + 1;
  }
  return [skip, text.slice(nl + 1)];
}

/** The offset of the first character of the log at `path` that starts at or
 * after `offset` (0 if that is before the log's start): a page that began
 * inside one would show its bytes as U+FFFD, and the page before it whole. */
async function charStart(path, offset) {
  if (offset <= 0) return 0;
  const raw = await logBytes(path, offset, 3);
  let stray = 0;
  while (stray < raw.length && (raw[stray] & 0xc0) === 0x80) stray++;   // continuation bytes
  return offset + stray;
}

/** Lay out the last blocks of a group for real, at least `height` pixels of them
 * (or all): the browser would draw them only once it saw them near the view. */
function drawLast(group, height) {
  for (let block = group.lastElementChild; block && height > 0; block = block.previousElementSibling) {
    block.style.contentVisibility = 'visible';
    height -= block.offsetHeight;
  }
}

/** A range holding the character at the point (x, y) of the window, or null. */
function caretAt(x, y) {
  let node, offset;
  if (document.caretPositionFromPoint) {
    const at = document.caretPositionFromPoint(x, y);
    [node, offset] = at ? [at.offsetNode, at.offset] : [];
  } else if (document.caretRangeFromPoint) {   // (Safari)
    const at = document.caretRangeFromPoint(x, y);
    [node, offset] = at ? [at.startContainer, at.startOffset] : [];
  }
  if (!node || node.nodeType !== Node.TEXT_NODE || !node.length) return null;
  const range = document.createRange(), at = Math.min(offset, node.length - 1);
  range.setStart(node, at);
  range.setEnd(node, at + 1);
  return range;
}

/** At most `limit` of the stored bytes of the log at `path` from byte `offset`. */
async function logBytes(path, offset, limit) {
  const d = readDeadline(view && view.signal);
  try {
    const res = await fetch(`${API}${path}/logs?format=text&offset=${offset}&limit=${limit}`, {
      cache: 'no-store', signal: d.signal,
      headers: {Authorization: `Token ${token}`, Accept: 'text/plain'}});
    if (!res.ok) throw refusal(res, await jsonOf(res, d));
    return await bodyOf(res, d);
  } catch (e) {
    if (e.name === 'AbortError' || e instanceof ApiError) throw tooSlow(d, e);
    throw unreachable();
  } finally {
    d.end();
  }
}

// ANSI: colours and styles of SGR sequences become styled spans; every other
// escape or control sequence is dropped, with the contents of the string ones
// (OSC, DCS, SOS, PM, APC) ended on their line. A sequence cut by a chunk
// boundary is carried to the next chunk.

const PALETTE = ['#4b5260', '#ff6b6b', '#5fd38d', '#e8c26a', '#6aa7ff', '#d98ae8', '#4cc9d4', '#d7dee8',
                 '#8a94a3', '#ff8f8f', '#7fe3a3', '#ffd866', '#8dbcff', '#eaa6f5', '#74e0e8', '#ffffff'];
const ESCAPE = /([^\x1b]+)|\x1b\[([0-?]*)[ -/]*([@-~])|\x1b[\]PX^_][^\x07\x1b\n]*(?:\x07|\x1b\\)|\x1b(?:[ -/]+[0-~]|[0-OQ-WYZ\\`-~])/y;
const PARTIAL = /^\x1b(?:\[[0-?]*[ -/]*|[\]PX^_][^\x07\x1b\n]*\x1b?|[ -/]*)$/;
const SGR = /\x1b\[[0-9;:]*m/g;
const BIDI_CONTROLS = /[\u202a-\u202e\u2066-\u2069]/g;

/** Text with its bidirectional controls (which could make it read in another
 *  order than it runs) written out as <U+202E>, as `less` shows them. */
/** Resolves once the page is visible (at once if it is), or `signal` aborts. */
function visible(signal) {
  return new Promise(resolve => {
    const check = () => {
      if (document.hidden && !signal.aborted) return;
      document.removeEventListener('visibilitychange', check);
      signal.removeEventListener('abort', check);
      resolve();
    };
    document.addEventListener('visibilitychange', check);
    signal.addEventListener('abort', check);
    check();
  });
}

function visibleControls(text) {
  return text.replace(BIDI_CONTROLS, c => `<U+${c.charCodeAt(0).toString(16).toUpperCase()}>`);
}

/** A line after its lone "\r"s (progress bars): what was written last, in the
 *  colours set before it. */
function rewound(line) {
  const at = line.lastIndexOf('\r');
  return at < 0 ? line : (line.slice(0, at).match(SGR) || []).join('') + line.slice(at + 1);
}

function ansiState() {
  return {fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, inverse: false, carry: ''};
}

function color256(n) {
  if (!(n >= 0 && n < 256)) return null;
  if (n < 16) return PALETTE[n];
  if (n >= 232) { const g = (n - 232) * 10 + 8; return `rgb(${g},${g},${g})`; }
  const c = x => (x ? x * 40 + 55 : 0);
  n -= 16;
  return `rgb(${c(Math.floor(n / 36))},${c(Math.floor(n / 6) % 6)},${c(n % 6)})`;
}

function sgr(st, params) {
  const p = params.split(/[;:]/).map(x => (x === '' ? 0 : Number(x)));
  for (let i = 0; i < p.length; i++) {
    const n = p[i];
    if (n === 0) Object.assign(st, ansiState(), {carry: st.carry});
    else if (n === 1) st.bold = true;
    else if (n === 2) st.dim = true;
    else if (n === 3) st.italic = true;
    else if (n === 4) st.underline = true;
    else if (n === 7) st.inverse = true;
    else if (n === 22) st.bold = st.dim = false;
    else if (n === 23) st.italic = false;
    else if (n === 24) st.underline = false;
    else if (n === 27) st.inverse = false;
    else if (n >= 30 && n <= 37) st.fg = PALETTE[n - 30];
    else if (n >= 90 && n <= 97) st.fg = PALETTE[n - 82];
    else if (n >= 40 && n <= 47) st.bg = PALETTE[n - 40];
    else if (n >= 100 && n <= 107) st.bg = PALETTE[n - 92];
    else if (n === 39) st.fg = null;
    else if (n === 49) st.bg = null;
    else if (n === 38 || n === 48) {
      let c = null;
      if (p[i + 1] === 5) { c = color256(p[i + 2]); i += 2; }
      else if (p[i + 1] === 2) { c = `rgb(${p.slice(i + 2, i + 5).map(x => Math.min(255, x | 0)).join(',')})`; i += 4; }
      if (c) st[n === 38 ? 'fg' : 'bg'] = c;
    }
  }
}

function styledText(text, st) {
  let fg = st.fg, bg = st.bg;
  if (st.inverse) [fg, bg] = [bg || 'var(--log-bg)', fg || 'var(--log-fg)'];
  if (!fg && !bg && !st.bold && !st.dim && !st.italic && !st.underline) return document.createTextNode(text);
  const span = document.createElement('span');
  span.textContent = text;
  if (fg) span.style.color = fg;
  if (bg) span.style.backgroundColor = bg;
  if (st.bold) span.style.fontWeight = 'bold';
  if (st.dim) span.style.opacity = '0.7';
  if (st.italic) span.style.fontStyle = 'italic';
  if (st.underline) span.style.textDecoration = 'underline';
  return span;
}

/** Whether `text` rewrites its line: a lone "\r", as ansiNodes sees one (not
 * of a "\r\n", nor the last character, which waits for what follows). */
function rewritesLine(text) {
  return /\r(?!\r*\n)[^]/.test(text);
}

/** Log text as nodes (when `draw`), advancing the ANSI state `st`. */
function ansiNodes(text, st, draw) {
  text = st.carry + text;
  st.carry = '';
  if (text.endsWith('\r')) { st.carry = '\r'; text = text.slice(0, -1); }   // maybe half of "\r\n"
  if (text.includes('\r')) text = text.replace(/\r+\n/g, '\n').split('\n').map(rewound).join('\n');   // "\r\n" ends a line
  const out = document.createDocumentFragment();
  let run = '';
  const emit = () => { if (run && draw) out.append(styledText(run, st)); run = ''; };
  let pos = 0;
  while (pos < text.length) {
    ESCAPE.lastIndex = pos;
    const m = ESCAPE.exec(text);
    if (!m) {   // an escape that is not (yet) complete
      const rest = text.slice(pos);
      if (rest.length < 4096 && PARTIAL.test(rest)) { st.carry = rest + st.carry; break; }
      pos += /^\x1b[\]PX^_]/.test(rest) ? 2 : 1;   // a string never ended (by its line's end): shown, less its start
      continue;
    }
    pos = ESCAPE.lastIndex;
    if (m[1] !== undefined) run += visibleControls(m[1].replace(/[\x00-\x08\x0b-\x1f\x7f]/g, ''));
    else if (m[3] === 'm' && !/^[<=>?]/.test(m[2])) { emit(); sgr(st, m[2]); }
  }
  emit();
  return out;
}

// Start -----------------------------------------------------------------------

async function start() {
  window.addEventListener('hashchange', route);
  document.getElementById('forget').addEventListener('click', () =>
    signOut('Token forgotten: this browser no longer keeps it.', true));
  // Forgotten in another tab: this one signs out too (it held the token in memory).
  window.addEventListener('storage', e => {
    if (e.key === TOKEN_KEY && !e.newValue && token) signOut('Signed out in another tab (its token was forgotten there, or refused).', true);
  });
  if (!token) return showLogin();
  try {
    me = await api(ME_PATH, {signal: null});
    route();
  } catch (e) {
    if (e.status === 401) return signOut(EXPIRED);
    show(h('div', {class: 'card'}, h('h1', {tabindex: -1}, 'Cannot start'),
      h('p', {class: 'error'}, e.message), h('button', {type: 'button', onclick: () => location.reload()}, 'Try again')));
  }
}

start();
</script>
</body>
</html>
"""


def dashboard_headers(page):
    """Headers for the page: a policy that allows its own inline script and
    style, identified by their hashes, and nothing else."""
    def digest(tag):
        inline = re.search(r"<%s>(.*?)</%s>" % (tag, tag), page, re.S).group(1)
        return "'sha256-%s'" % base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    return {
        "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')};"
            " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
            " frame-ancestors 'none'"),
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


DASHBOARD_PAGE = DASHBOARD_HTML.encode(), dashboard_headers(DASHBOARD_HTML)


###############################################################################
# Serving #####################################################################
###############################################################################

def _proxy_settings(proxy):
    """waitress's settings to believe `proxy`'s X-Forwarded-* headers: the
    client's address (for --auth-burst), and the scheme and host of the links
    in pages. Nobody else's are believed: waitress drops them."""
    if not proxy:
        return {}
    return {"trusted_proxy": proxy, "trusted_proxy_count": 1,
            "trusted_proxy_headers": {"x-forwarded-for", "x-forwarded-host",
                                      "x-forwarded-proto", "x-forwarded-port"},
            "clear_untrusted_proxy_headers": True, "log_untrusted_proxy_headers": False}


def serve(config):
    """Run the server until SIGINT, SIGTERM or SIGHUP; returns the exit code."""
    _make_private_dir(config.data_dir)
    refused = _hold_serve_locks(config.data_dir)
    if refused:
        return _fail(refused, 1)
    return _serve_held(config)


def _hold_serve_locks(data_dir):
    """Take the data folder's serve locks for as long as this process lives;
    returns why not, or None. Bare descriptors, which nothing closes: a lock
    let go when serve returns (a file object's) told the next server, started
    while this one's interpreter wound down, that this one still ran on a
    copy of its folder, and that start left its builds' leftovers alone."""
    import fcntl
    held = []
    for path in _serve_locks(data_dir):
        try:
            held.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
            fcntl.flock(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            for fd in held:
                os.close(fd)
            if isinstance(e, BlockingIOError):
                return f"another server is using {data_dir}"
            # a folder it may not write, a file system without locks (NFS), ...
            return f"cannot lock {path}: {e.strerror or e}"
    return None


def _serve_held(config):
    """serve(), once the data folder is this server's."""
    cores = _keep_to_one_core()  # before any thread starts: they inherit it
    _adopt_orphans()
    app = make_app(config, start=False)  # no build starts before the port is ours
    app.runner.cores = cores
    _warn_if_open(config.data_dir, config.db_path)
    try:
        server = http_server(app, config)
    except (OSError, ValueError) as e:  # ValueError: a host name that does not resolve
        app.close()
        reason = getattr(e, "strerror", None) or e
        return _fail(f"cannot listen on {config.host}:{config.port}: {reason}", 1)
    finished = threading.Event()

    def shut_down():
        log.info("shutting down: stopping running builds")
        app.shutdown(timeout=SHUTDOWN_SECONDS)
        finished.set()
        server.pull_trigger()

    def on_signal(signum, frame):
        if not app.closing:
            app.closing = True
            threading.Thread(target=shut_down, name="shutdown").start()

    # Before any build starts, so that a signal always stops builds cleanly.
    _take_stop_signals(on_signal)
    try:  # only now that nothing can fail before it is seen
        _make_first_admin(app.store)
    except OutputFailed as e:
        app.close()
        return _fail(f"cannot show the admin's token: {e}", EXIT_OUTPUT_FAILED)
    if _early_signals:  # it came while the server was being set up: no build starts now
        signum = _early_signals[0]
        _early_signals.clear()
        on_signal(signum, None)
    if not app.closing:
        app.runner.start()
    print(f"buildserver {__version__} listening on "
          f"http://{_url_host(server.effective_host)}:{server.effective_port}/", flush=True)
    log.info("serving %s with %d workers", os.path.abspath(config.data_dir), config.workers)
    _warn_if_exposed(server.effective_host, config.trusted_proxy)
    _return_startup_memory()
    # waitress's own run(), but stoppable: signal handlers run here, between polls.
    # It listens on while the builds are stopped: a client (or a proxy) whose
    # follow ended with its build's stop reads next how it ended (see _answering).
    reap_at = 0.0
    while not finished.is_set():
        _poll(server, 0.5)
        if time.monotonic() >= reap_at:  # a stop reaps at once what it waits for
            _reap_adopted()
            reap_at = time.monotonic() + REAP_SECONDS
    _close_after_shutdown(server, app)
    log.info("stopped")
    return 0


def _make_first_admin(store):
    """On a new database, make the user `admin` and show its token (first:
    a token that cannot be shown leaves no admin; OutputFailed)."""
    if store.user_count() > 0:
        return
    token = fresh_token()
    _show_token(f"Created the admin user 'admin'. Its token, shown only now: {token}")
    if store.create_user("admin", is_admin=True, token=token) is None:
        log.warning("the user 'admin' was made meanwhile by another command; "
                    "the token above was not recorded")


def _warn_if_exposed(host, trusted_proxy):
    if _loopback(host):
        return
    if not trusted_proxy:
        log.warning("listening beyond this machine over plain HTTP: tokens, which run "
                    "commands here, travel unencrypted; put a TLS proxy in front (README, "
                    "\"Security and operations\")")
    elif _loopback(trusted_proxy):
        log.warning("listening beyond this machine, though the trusted proxy is on it (%s): "
                    "clients can reach the server past it, over plain HTTP; listen on "
                    "127.0.0.1", trusted_proxy)


def _poll(server, timeout):
    """One turn of waitress's event loop."""
    from waitress import wasyncore
    wasyncore.loop(timeout=timeout, map=server._map, use_poll=True, count=1)


def _close_after_shutdown(server, app):
    """Once the builds are stopped: answer a moment longer, stop listening,
    send what followers still have on its way, then close everything."""
    from waitress import wasyncore
    # Followers have had their builds' ends: their clients ask next how those
    # ended, through a proxy a round trip or two later.
    linger_until = time.monotonic() + (SHUTDOWN_LINGER_SECONDS if app.waited_on else 0)
    while time.monotonic() < linger_until:
        _poll(server, 0.05)
    server.del_channel()
    server.socket.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(  # followers' last bytes still on their way
            c.total_outbufs_len for c in list(server.active_channels.values())):
        _poll(server, 0.05)
    server.task_dispatcher.shutdown(timeout=5)
    wasyncore.close_all(server._map)
    app.close()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_early_signals = []  # those that came before serve() could act on them


def _take_stop_signals(handler):
    """Have `handler` take SIGTERM, SIGINT and SIGHUP. SIGHUP: the terminal
    it ran in was closed; its builds, in sessions of their own, would outlive
    it unsupervised. Unless told to ignore it (nohup). (A SIGINT ignored by a
    script's `&` is taken all the same: `kill -INT` must stop the server, and
    its builds would inherit the ignoring.)"""
    for signum in STOP_SIGNALS:
        if signum != signal.SIGHUP or signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)
    if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:  # (`&` ignores it too)
        # Still nothing to the server, but a handler, unlike SIG_IGN, is not
        # passed on: its builds start with the default, as from a terminal.
        signal.signal(signal.SIGQUIT, lambda signum, frame: None)


def _hold_stop_signals(hold):
    """Keep stop signals pending (or no longer): one that came while this
    process replaced itself (serve_as_module) or started would have ended it
    before it could stop anything, where `serve` promises an exit of 0.
    (A blocked signal stays pending across exec.)"""
    with contextlib.suppress(AttributeError, OSError):  # (no pthread_sigmask)
        signal.pthread_sigmask(signal.SIG_BLOCK if hold else signal.SIG_UNBLOCK, STOP_SIGNALS)


def _loopback(address):
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a name
        return False


def _one_address(host):
    """`host`, or the address to listen on when it names several (localhost as
    ::1 and 127.0.0.1): waitress would listen on each, through another kind of
    server. The first IPv4 one, as the URLs people type say 127.0.0.1."""
    try:
        found = [(family, info[0]) for family, _, _, _, info in socket.getaddrinfo(
            host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)]
    except (socket.gaierror, UnicodeError):
        return host  # waitress says so, in its words
    if len({address for _, address in found}) <= 1:
        return host
    return next((a for family, a in found if family == socket.AF_INET), found[0][1])


def http_server(app, config):
    """waitress, listening for `app` as `config` says (not yet serving)."""
    import waitress
    from waitress.task import ThreadedTaskDispatcher
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.queue_cv = _WarmestFirst(dispatcher.lock)
    server = waitress.create_server(
        app, _dispatcher=dispatcher, host=_one_address(config.host), port=config.port,
        threads=config.threads,
        ident="buildserver", max_request_body_size=LOG_BODY_LIMIT + MiB,
        outbuf_overflow=16 * MiB, connection_limit=_connection_limit(config),
        channel_request_lookahead=1,  # lets a follower see that its client left
        # A connection ended early (a client gone; a log deleted while it was
        # sent, which LogFile logs in a line) is no fault worth a traceback.
        log_socket_errors=False, **_proxy_settings(config.trusted_proxy))
    # Big sends for log downloads (set on each accepted connection).
    server.adj.socket_options = server.adj.socket_options + [
        (socket.SOL_SOCKET, socket.SO_SNDBUF, 1 * MiB)]
    server.channel_class = _channel_class()
    idle_channels_closed = server.maintenance

    def maintenance(now):  # every cleanup_interval (30 s)
        idle_channels_closed(now)
        app.db.replaced()
        app.throttle.forget_quiet()
        overdue, stalled = time.monotonic() - HEAD_SECONDS, now - ANSWER_STALL_SECONDS
        for channel in list(server.active_channels.values()):
            if channel.head_began is not None and channel.head_began < overdue and \
                    not channel.requests:  # (a head read ahead of an answer may wait)
                channel.will_close = True  # a slow-loris: its head trickles in
            # (now and last_activity are waitress's, the wall clock: a jump of the
            # clock by a minute would close such connections early; no worse.)
            elif channel.total_outbufs_len and channel.last_activity < stalled:
                # Its client takes nothing of what waits for it (a log, say, held
                # in memory or a temporary file): waitress closes a connection
                # only once it can write to it, which would be never.
                log.warning("a client took nothing of its answer for %.0f s: connection closed",
                            now - channel.last_activity)
                channel.handle_close()
    server.maintenance = maintenance
    dispatcher.set_thread_count(config.threads)  # once listening: no threads left on a failure
    return server


class _WarmestFirst:
    """The condition waitress's idle HTTP threads wait on (given through
    create_server's `_dispatcher`), which wakes the thread that went idle
    last, where threading.Condition wakes the one idle longest: its stack,
    its SQLite connection and the core's caches are still warm (a dispatch
    took 3.46 ms instead of 3.66, a stop 2.72 instead of 2.97). waitress calls
    wait(), notify() and notify_all(), holding `lock`."""

    def __init__(self, lock):
        self._lock = lock
        self._waiters = []  # a locked lock per waiting thread, the last to wait last

    def wait(self, timeout=None):
        waiter = threading.Lock()
        waiter.acquire()
        self._waiters.append(waiter)
        self._lock.release()
        woken = False
        try:  # until notify() releases it
            woken = waiter.acquire(True, -1 if timeout is None else timeout)
        finally:
            self._lock.acquire()
            if not woken:  # timed out, or interrupted: a notify must not be spent on it
                try:
                    self._waiters.remove(waiter)
                except ValueError:  # notified as it timed out: that notify was its
                    woken = True
        return woken

    def notify(self, n=1):
        for _ in range(min(n, len(self._waiters))):
            self._waiters.pop().release()

    def notify_all(self):
        self.notify(len(self._waiters))


def _connection_limit(config):
    """Connections open at once: half the file descriptors the process may
    open (the rest are for the database and builds' pipes), so that idle
    keep-alive connections (a client's big pool, a slow-loris) do not shut
    others out at a hundred. (The limit is not raised: builds inherit it.)"""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return max(100, config.threads * 4)
    if soft == resource.RLIM_INFINITY:
        return 10000
    return max(100, min(10000, soft // 2))


def _keep_to_one_core():
    """Keep this process's threads to one core, the one it runs on (Linux):
    the GIL runs one at a time anyway, and handing work to a thread asleep on
    another core costs more than the work on a small VM (a dispatch took 3.6
    ms instead of 4.1 on two vCPUs). Returns the cores it had, for the
    workers to take back (builds keep them all), or None if nothing changed."""
    try:
        cores = os.sched_getaffinity(0)
        if len(cores) < 2:
            return None
        fields = _stat("thread-self")  # field 39, "processor": where it last ran
        here = int(fields[36]) if len(fields) > 36 else min(cores)
        os.sched_setaffinity(0, {here if here in cores else min(cores)})
        return cores
    except (AttributeError, OSError, ValueError):  # not Linux, or not allowed
        return None


def _unquoted_headers(text):
    """waitress's words on a malformed header line, with the line's value left
    out: it may be a token ("Authorization: Token ...\\r")."""
    def name_only(match):
        name, colon, _ = match.group(1).partition(":")
        return f'header line "{name[:64]}: ..."' if colon else "header line (not shown)"
    return re.sub(r'header line "(.*)"', name_only, text, flags=re.S)


def _channel_class():
    """waitress's HTTP channel, changed so that:

    - its parser refuses a body over its path's limit from its Content-Length:
      the app sees the request at once, with no body, and answers 413; the
      connection closes after the answer (its unread body is never parsed as
      requests). Up to REFUSED_DRAIN bytes of that body are read and dropped
      first, as they come: closing with them unread would reset the
      connection, and a client that sends its whole body before it reads
      (Python's http.client and requests do) would get the reset, not the 413;
    - its parser answers 400 to a Content-Length of more than 4300 digits
      (Python's int() refused it, and the connection was dropped), closes
      the connection after a badly framed request, and invites no body
      (100 Continue) that a request says it has not;
    - an answer's head goes out with the first bytes of its body, in one send:
      the client wakes once, not twice;
    - the connection stays open after a chunked answer (a followed log), as
      HTTP/1.1 allows: waitress closes it, and a client that follows a build
      and then asks for it would have to connect again. An answer cut short
      (an error, a client gone) still closes it; a HEAD answer gets no last
      chunk (waitress would send one, a stray body);
    - its own error answers are JSON, like the app's;
    - it knows since when a request's head has been arriving: one still not
      whole after HEAD_SECONDS closes a connection with no request in hand
      (see http_server);
    - it wakes a waiting follower when its client leaves (waitress only
      marks the connection, which the follower would see a second later);
    - it names the address the client reached as SERVER_NAME (for links),
      and closes at once a connection that opens with a TLS handshake.
    """
    from waitress.channel import HTTPChannel
    from waitress.parser import HTTPRequestParser, ParsingError
    from waitress.task import ErrorTask, WSGITask
    from waitress.utilities import RequestEntityTooLarge

    class Parser(HTTPRequestParser):
        def parse_header(self, header_plus):
            try:
                super().parse_header(header_plus)
            except ValueError as e:
                if isinstance(e, UnicodeError):
                    raise
                # Its int() of a Content-Length past Python's 4300 digits: the
                # connection was dropped unanswered, and a traceback logged.
                raise ParsingError("Content-Length has more than 4300 digits") from None
            # Framed both ways, what follows its chunks is another request to
            # the server, and its body to a proxy that trusts the length: the
            # connection ends with the answer (RFC 9112, 6.3). So does one of
            # HTTP/1.0 with chunks, which waitress reads by its length (6.1).
            self.badly_framed = (self.chunked and "CONTENT_LENGTH" in self.headers
                                 or self.version == "1.0" and "TRANSFER_ENCODING" in self.headers)
            if not (self.chunked or self.content_length):
                # No body to invite: waitress sent 100 Continue all the same and
                # waited for the body; the next request's headers were then
                # added to this one's (its Authorization included).
                self.expect_continue = False
            self.body_refused = self.content_length > body_limit(self.path)
            if self.body_refused:
                self.body_rcv = None  # so the request is complete without its body
                self.expect_continue = False  # and the body is not invited

    class Task(WSGITask):
        _keeping_open = False

        def get_environment(self):
            environ = super().get_environment()
            channel = self.channel  # what a follower has waiting for its client
            if channel.local_address is not None:  # not "waitress.invalid", a link's host
                environ["SERVER_NAME"] = channel.local_address  # when the request names none
            environ["buildserver.backlog"] = lambda: channel.total_outbufs_len
            environ["buildserver.when_gone"] = channel.when_gone
            environ["buildserver.hang_up"] = channel.hang_up
            return environ

        def build_response_header(self):
            if getattr(self.request, "body_refused", False):  # its unread body must not
                super().set_close_on_finish()                 # be taken for requests
                self.channel.drain_before_closing(self.request.content_length)
            elif getattr(self.request, "badly_framed", False):
                super().set_close_on_finish()
            self._keeping_open = (self.version == "1.1" and not self.close_on_finish and
                                  self.request.headers.get("CONNECTION", "").lower() != "close")
            try:
                return super().build_response_header()
            finally:
                self._keeping_open = False

        def set_close_on_finish(self):
            if not self._keeping_open:  # while the head is built, only chunking asks
                super().set_close_on_finish()

        def finish(self):
            if self.request.command == "HEAD":  # no body: not even the last chunk
                if not self.wrote_header:
                    self.write(b"")
                self.chunked_response = False
            super().finish()

        def write(self, data):
            if self.wrote_header or not data or len(data) > COALESCE_BYTES:
                return super().write(data)
            channel = self.channel
            channel.holding = True
            try:
                super().write(data)
            finally:
                channel.holding = False
                channel.release_head()

    class JSONErrorTask(ErrorTask):
        """waitress's own refusals (a malformed request, a body over its limit)
        in the API's one error shape, not as text/plain."""

        def execute(self):
            error = self.request.error
            body = json_bytes({"detail": f"{error.reason}: {_unquoted_headers(error.body)}"})
            self.status = f"{error.code} {error.reason}"
            self.response_headers += [("Content-Type", "application/json"),
                                      ("X-Content-Type-Options", "nosniff")]
            self.set_close_on_finish()
            if isinstance(error, RequestEntityTooLarge):  # (a chunked body: no length)
                self.channel.drain_before_closing(self.request.content_length or None)
            self.content_length = len(body)
            self.write(body)

    class Channel(HTTPChannel):
        parser_class = Parser
        task_class = Task
        error_task_class = JSONErrorTask
        holding, _head = False, None
        head_began = None  # when a request whose head is not all here began (or the connection)
        _gone_callback = None
        _to_drain = None  # bytes of a refused body still to drop before closing
        _draining = False  # the answer is sent, and the connection half-closed
        _spoken = False  # the client has sent something

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # A connection that never sends a byte holds its place too, and
            # waitress's idle timeout would take 120 s to end it.
            self.head_began = time.monotonic()
            try:  # the address the client reached (of 0.0.0.0, the one it chose)
                name = self.socket.getsockname()
            except OSError:
                name = None
            self.local_address = name[0] if isinstance(name, tuple) else None

        def drain_before_closing(self, length):
            """Once the answer is sent, read and drop the refused body (of
            `length` bytes, None if unknown) before closing; not when it is
            too long to be worth it."""
            if length is None or length <= REFUSED_DRAIN:
                self._to_drain = REFUSED_DRAIN

        def handle_write(self):
            if self._to_drain is None or self.will_close or not self.close_when_flushed:
                return super().handle_write()
            self.close_when_flushed = False  # waitress would close once flushed
            super().handle_write()
            if self.will_close or not self.connected:  # the send failed: it closed
                return
            if self.total_outbufs_len:  # the rest of the answer first
                self.close_when_flushed = True
                return
            try:  # the client sees the answer end; what it still sends is dropped
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                self.handle_close()
                return
            self._draining = True  # readable() holds: handle_read drops it

        def hang_up(self):
            """Close the connection (in the event loop), dropping what still
            waits for the client: a follower cut off for taking nothing would
            take none of it, and waitress would keep the connection for as
            long, since it closes one only once it can write to it."""
            self.server.trigger.pull_trigger(lambda: self.connected and self.handle_close())

        def when_gone(self, callback):
            """Call `callback` (once, in the event loop) when the client has
            gone: a waiting follower then frees its thread and slot at once;
            None forgets it."""
            self._gone_callback = callback

        def _tell_gone(self):
            callback, self._gone_callback = self._gone_callback, None
            if callback is not None:
                callback()

        def handle_read(self):
            if self._draining:  # (an idle one is closed by maintenance, as any)
                try:
                    data = self.recv(self.adj.recv_bytes)  # b"" once it closed
                except OSError:
                    data = b""
                self._to_drain -= len(data)
                if self.connected and (not data or self._to_drain <= 0):
                    self.handle_close()
                return
            super().handle_read()
            if not self.connected:  # the client closed its end
                self._tell_gone()

        def handle_close(self):  # a reset, or a send that failed
            super().handle_close()
            self._tell_gone()

        def received(self, data):
            if not self._spoken:
                self._spoken = True
                if data[:1] == b"\x16":  # a TLS handshake: https:// to this plain HTTP port
                    self.handle_close()  # said at once: it would wait for a head in vain
                    return False
            began = self.head_began or time.monotonic()
            try:
                return super().received(data)
            finally:
                request = self.request
                self.head_began = began if request is not None and \
                    not request.headers_finished else None

        def write_soon(self, data):
            if self.holding and self._head is None:
                self._head = data
                return len(data)
            if self._head is not None:
                data, self._head = self._head + data, None
            return super().write_soon(data)

        def release_head(self):
            """Send a head that no body joined (e.g. a 304)."""
            if self._head is not None:
                head, self._head = self._head, None
                super().write_soon(head)

    return Channel


def _return_startup_memory():
    """Compiling this file at start leaves megabytes of freed memory in the
    process; hand them back to the system (glibc only)."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


###############################################################################
# Client ######################################################################
###############################################################################
# `run`, `status`, `logs`, `stop` and `builds` talk to a server over HTTP with
# the standard library alone, so this file can be copied onto any box that
# triggers builds, with or without bottle and waitress.

EXIT_UNREACHABLE = 75   # the server cannot be reached (EX_TEMPFAIL)
EXIT_UNKNOWN = 76       # a request went, its answer was lost: it may have been done (EX_PROTOCOL)
EXIT_REFUSED = 77       # the server refuses the token (EX_NOPERM)
DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_OUTPUT_CLOSED = 141  # what the output was piped to went away (as SIGPIPE would end a tool)
EXIT_OUTPUT_FAILED = 74   # the output cannot be written where it goes, a full disk say (EX_IOERR)
RECONNECT_SECONDS = 60  # how long a follower keeps trying to get back to the server
RUN_EXIT_CODES = """exit codes:
  0        the build succeeded
  1-255    it failed with that code (1: without one, or stopped)
  1        the server refused the request (the reason is printed)
  2        the command line is wrong, or no token is given
  74       the log cannot be written where it goes
  75       the server cannot be reached: nothing was done
  76       the build's outcome is unknown: the create's answer was lost,
           or the server was lost while following it (it says which)
  77       the server refuses the token
  130      Ctrl-C
  143, 129 SIGTERM or SIGHUP with --stop-on-interrupt
  141      the log's reader went away (| head)"""
GATEWAY_ERRORS = (502, 503, 504)  # the server, or a proxy in front, says: not now


class ClientError(Exception):
    """The server answered with an error: `status` and its `detail`."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Unreachable(Exception):
    """The server could not be reached, or the connection dropped."""


class AnswerLost(Unreachable):
    """A request was sent, and the connection dropped before its answer: it
    may have been done (a build made, say)."""


class OutputFailed(Exception):
    """The log (or `what` else) could not be written where it goes: a closed
    pipe, a full disk. Not the connection's fault: nothing to reconnect for."""

    def __init__(self, error, what="the log"):
        super().__init__(error.strerror or str(error))
        self.error, self.what = error, what


class _SignalWatch:
    """Lets Ctrl-C, SIGTERM or SIGHUP end a blocking read at once. CPython runs a
    signal's handler between bytecodes: a signal that comes after the last
    of them and before a socket read begins waited until the read ended (a
    quiet build's follow: its 30 s timeout). Its C handler writes to a
    wakeup pipe; a thread waiting on that shuts the socket being read, the
    read returns, and the handler runs."""

    def __init__(self):
        self.sock, self.watching = None, False

    @contextlib.contextmanager
    def interrupt(self, sock):
        """While `sock` is read: a signal shuts it."""
        self._watch()
        self.sock = sock
        try:
            yield
        finally:
            self.sock = None

    def _watch(self):
        if self.watching:
            return
        try:
            r, w = os.pipe()
            os.set_blocking(w, False)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except (ValueError, OSError):  # not the main thread: a read keeps to its timeout
            return
        self.watching = True
        threading.Thread(target=self._shut_on_signal, args=(r,), name="signals",
                         daemon=True).start()

    def _shut_on_signal(self, r):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the main thread's
        while os.read(r, 512):
            sock = self.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


_SIGNALS = _SignalWatch()


class BadToken(ValueError):
    """A token that no server gave: it holds characters no token has."""


class Client:
    """buildserver's REST API over http.client.

    :param url: the server, e.g. http://127.0.0.1:8000
    :param token: sent as `Authorization: Token ...`
    """

    def __init__(self, url, token, timeout=30.0):
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"the server URL must start with http:// or https://, not {url!r}")
        if "@" in parts.netloc:  # (not echoed: it may hold a password)
            raise ValueError("the server URL must not hold a user name or password; "
                             "the token goes in BUILDSERVER_TOKEN or --token")
        if not parts.hostname:
            raise ValueError(f"the server URL names no host: {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._scheme, self._netloc, self._base = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self.token, self.timeout = token, timeout
        import http.client  # here, not at the top: the server never needs it
        if token and not re.fullmatch(r"[\x21-\x7e]+", token):
            raise BadToken("the token holds characters no token has (spaces, line breaks, ...)")
        try:  # what http.client would refuse only when it sends the first request
            parts.port, (parts.hostname or "").encode("idna"), self._base.encode("ascii")
        except (UnicodeError, ValueError) as e:
            raise ValueError(f"{url!r} is not a server URL: {e}") from None
        # What a connection that drops mid-answer raises (IncompleteRead,
        # RemoteDisconnected and BadStatusLine are HTTPExceptions).
        self._dropped = (OSError, EOFError, http.client.HTTPException)

    def _connect(self):
        import http.client
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._netloc, timeout=self.timeout)

    def _tls_hint(self, error):
        """What a handshake that failed may mean (the server closes one at once)."""
        if self._scheme == "https":
            import ssl  # (there, as http.client's HTTPS is)
            if isinstance(error, (ssl.SSLError, ConnectionResetError)):
                return " (is it a plain http:// server?)"
        return ""

    def _open(self, method, path, body=None, accept="application/json"):
        """An open response, or ClientError/Unreachable."""
        headers = {"Accept": accept}
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        if body is not None:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connect()
        try:
            conn.request(method, self._base + path, body=body, headers=headers)
        except self._dropped as e:
            conn.close()
            raise Unreachable(f"cannot reach {self.url}: {e}{self._tls_hint(e)}") from None
        try:
            response = conn.getresponse()
        except self._dropped as e:
            conn.close()
            lost = AnswerLost if method == "POST" else Unreachable  # (the others may be sent again)
            raise lost(f"{method} {self.url}{path} got no answer: {e}") from None
        if response.status >= 300:  # a redirect too: to https://, say (the URL to give instead)
            try:
                data = response.read()
            except self._dropped:
                data = b""
            conn.close()
            if method == "POST" and response.status in (502, 504):  # buildserver sends neither
                raise AnswerLost(f"{method} {self.url}{path}: {response.status} {response.reason}"
                                 " from a proxy, which got no answer in time")
            raise ClientError(response.status, _error_detail(response, data, self.url + path, path))
        return conn, response

    def call(self, method, path, body=None):
        """One request; the decoded JSON answer."""
        conn, response = self._open(method, path, body)
        try:
            return json.loads(response.read())
        except self._dropped + (ValueError,) as e:  # ValueError: not JSON, an answer cut short
            lost = AnswerLost if method == "POST" else Unreachable
            raise lost(f"the connection to {self.url} broke: {e}") from None
        finally:
            conn.close()

    def stream_log(self, build_path, offset, out, follow=True):
        """Copy the log from byte `offset` to `out` as it arrives; returns the
        offset reached. Raises Unreachable with `.offset` when the connection drops."""
        query = f"?offset={offset}" + ("&follow=1" if follow else "")
        try:
            # A follow that hears nothing for `timeout` connects again: the server
            # says nothing while a build is quiet, and the link may have died.
            conn, response = self._open("GET", f"{build_path}/logs{query}", accept="text/plain")
        except Unreachable as e:
            e.offset, e.got_through = offset, False
            raise
        try:
            with _SIGNALS.interrupt(conn.sock):
                while True:
                    data = response.read1(65536)
                    if not data:
                        if response.length:  # it ended before the length it announced
                            raise EOFError(f"the answer ended {response.length} bytes short")
                        return offset
                    try:
                        _write_fully(out, data)
                    except OSError as e:
                        raise OutputFailed(e) from None
                    offset += len(data)
        except self._dropped as e:
            error = Unreachable(f"the connection to {self.url} dropped: {e}")
            error.offset, error.got_through = offset, True
            raise error from None
        finally:
            conn.close()

    def follow(self, build_path, out, live=True):
        """Follow a build's log to `out` until the build is final, reconnecting
        (from the last byte received) for up to RECONNECT_SECONDS, also while
        the server or a proxy answers 502, 503 or 504 (a restart), counted
        from the last time it got through; returns the build. While the
        server has too many followers (503) but answers for the build, it
        waits for as long as the build runs. Not `live`: the log up to its
        end when last asked, and None; a download that has begun is resumed
        the same way, but an outage counts as over only once bytes came
        (answers that drop before any would have it try for ever), and one
        that has not begun is not tried again."""
        give_up_at, pause, offset = None, 0.2, 0
        while True:
            try:
                offset = self.stream_log(build_path, offset, out, follow=live)
                if not live:
                    return None
                build = self.call("GET", build_path)
                if build["last_status"] in FINAL and offset >= build["log_size"]:
                    return build
                give_up_at = None
            except (Unreachable, ClientError) as e:
                if isinstance(e, ClientError) and e.status not in GATEWAY_ERRORS:
                    raise
                moved = getattr(e, "offset", offset) > offset
                if not (live or moved or offset > 0):
                    raise  # nothing written yet: as for any other read
                if getattr(e, "got_through", False) and (live or moved):  # a new outage
                    give_up_at, pause = None, 0.2
                offset = getattr(e, "offset", offset)
                if isinstance(e, ClientError) and e.status == 503:
                    with contextlib.suppress(Unreachable, ClientError):
                        self.call("GET", build_path)  # it answers: a full cap, no outage
                        give_up_at = None  # (a final build's log is no follower's)
                now = time.monotonic()
                give_up_at = give_up_at or now + RECONNECT_SECONDS
                if now >= give_up_at:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 2.0)


def _error_detail(response, data, url, path):
    """What an error answer says: its detail and the reason for each field, or
    where a redirect of the request for `url` (the server's URL and `path`) points."""
    if 300 <= response.status < 400:
        if not response.getheader("Location"):
            return f"{response.reason}, to nowhere"
        location = urllib.parse.urljoin(url, response.getheader("Location"))
        if not location.endswith(path) or location == url:
            return f"{response.reason}: it points to {location}"
        return (f"{response.reason}: it points to {location}; give "
                f"{location[:len(location) - len(path)]} as the server URL")
    try:
        body = json.loads(data)
        detail, errors = body["detail"], body.get("errors") or {}
        return detail + "".join(f"\n  {field}: {reason}" for field, reason in errors.items()
                                if str(reason) not in detail)  # (not the sentence again)
    except (ValueError, KeyError, TypeError, AttributeError):
        text = data.decode("utf-8", "replace").strip()
        if text.startswith("<"):  # a proxy's page, most likely
            return f"{response.reason} (an HTML page, not buildserver's answer: from a proxy?)"
        return text or response.reason


def _project_spec(spec):
    user, _, project = spec.partition("/")
    if not (valid_name(user) and valid_name(project)):
        raise argparse.ArgumentTypeError(f"expected USER/PROJECT, got {spec!r}")
    return spec


def _env_pair(text):
    name, sep, value = text.partition("=")
    if name in BUILD_VARIABLES:
        raise argparse.ArgumentTypeError(f"the server sets {name} itself")
    if not sep or not conforms(name, FIELDS["env"]["propertyNames"]):
        raise argparse.ArgumentTypeError(f"expected NAME=value, got {text!r}")
    return name, value


def client_exit_code(build):
    """0 if the build succeeded, its own exit code if it failed with one, else
    1 (a stopped build too, whatever its shell's code on the way out)."""
    if build["last_status"] == "succeeded":
        return 0
    code = build.get("exit_code") if build["last_status"] == "failed" else None
    return code if isinstance(code, int) and 0 < code < 256 else 1


def _ago(stamp):
    if not stamp:
        return "-"
    seconds = (datetime.datetime.now(datetime.timezone.utc) - parse_iso(stamp)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{max(0, int(seconds))} s ago"


def _duration(seconds):
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _printable(text):
    """Text from the server as a terminal may show it: control characters
    (which could set its clipboard, or rewrite the lines above) and
    bidirectional ones written out as <U+001B>, as the dashboard shows them."""
    return CONTROLS.sub(lambda m: f"<U+{ord(m.group()):04X}>", str(text))


def _table(rows, header):
    rows = [[_printable(cell) for cell in row] for row in rows]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [header] + rows)


def _describe(build, statuses, code):
    lines = [f"build {build['id']} of {build['project']}: {build['last_status']}"
             + (f" (exit code {build['exit_code']})" if build["exit_code"] is not None else "")]
    for key in ("name", "user", "command", "tags", "created_at", "started_at", "finished_at"):
        value = build[key]
        if key == "tags":
            value = ", ".join(value) or None
        elif key.endswith("_at") and value:
            value = f"{value} ({_ago(value)})"
        lines.append(f"  {key.replace('_at', '').replace('_', ' '):<9} {value if value is not None else '-'}")
    lines.append(f"  {'duration':<9} {_duration(build['duration'])}")
    lines.append(f"  {'log':<9} {build['log_size']} bytes" + (" (truncated)" if build["truncated"] else ""))
    recorded = [code["commit"], code["branch"] and f"on {code['branch']}", code["git_url"],
                code["is_dirty"] and "(dirty)"]
    lines.append(f"  {'code':<9} {' '.join(filter(None, recorded)) or '-'}")
    lines.append("  history")
    for s in statuses:
        lines.append(f"    {s['created_at']}  {s['status']:<9}  {s['message'] or ''}".rstrip())
    return "\n".join(map(_printable, lines))


def run_client(args):
    """The client commands; returns the exit code."""
    if flag := _not_text(args):  # it would reach the server as escapes never typed
        return _fail(f"{flag} holds bytes that are no UTF-8 text", 2)
    if args.token == "":  # `--token "$TOKEN"` of an unset variable: not the environment's
        return _fail("--token is empty", 2)
    token = args.token or _env("token", "")
    if not token:  # (the server's 401 would tell of an HTTP header)
        return _fail("no token: set BUILDSERVER_TOKEN, or give --token", 2)
    try:
        client = Client(args.url, token)
    except ValueError as e:
        return _fail(f"{e}{_from_where(token if isinstance(e, BadToken) else args.url)}", 2)
    if sys.stdout is None:  # its descriptor was closed (`>&-`): print() would say nothing
        return _fail("cannot write the output: standard output is closed", EXIT_OUTPUT_FAILED)
    project = "/api/v1/" + urllib.parse.quote(args.project)
    command = {"run": _run_build, "builds": _list_builds, "status": _show_status,
               "stop": _stop_build, "logs": _show_log}[args.command]
    try:
        return command(client, project, args)
    except ClientError as e:
        code = EXIT_REFUSED if e.status in (401, 403, 429) else \
            EXIT_UNREACHABLE if e.status in GATEWAY_ERRORS else 1  # 429: too many bad tokens
        return _fail(f"the server says ({e.status}): {e.detail}", code)
    except AnswerLost as e:
        return _fail(f"{e}; it may have been done", EXIT_UNKNOWN)
    except Unreachable as e:
        return _fail(str(e), EXIT_UNREACHABLE)
    except (OutputFailed, BrokenPipeError) as e:
        return _output_failed(getattr(e, "error", e), getattr(e, "what", "the output"))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Terminated as e:  # (past where `run` takes it: no traceback)
        return 128 + e.args[0]


def _list_builds(client, project, args):
    query = {"limit": args.limit, "offset": args.offset,
             **({"status": args.status} if args.status else {})}
    page_ = client.call("GET", f"{project}/builds?{urllib.parse.urlencode(query)}")
    if args.json:
        _say(json.dumps(page_, indent=2))
    else:
        _say(_table([[b["id"], b["last_status"], b["name"] or "-", b["user"],
                       _ago(b["created_at"]), _duration(b["duration"]),
                       ",".join(b["tags"]) or "-"] for b in page_["results"]],
                     ["ID", "STATUS", "NAME", "USER", "CREATED", "DURATION", "TAGS"]))
    return 0


def _show_status(client, project, args):
    """A build (the latest if no id is given), its statuses and code reference."""
    build_id = args.id
    if build_id is None:
        latest = client.call("GET", f"{project}/builds?limit=1")["results"]
        if not latest:
            return _fail(f"{args.project} has no builds yet", 1)
        build_id = latest[0]["id"]
    path = f"{project}/builds/{build_id}"
    build = client.call("GET", path)
    statuses = client.call("GET", f"{path}/statuses?limit=1000")["results"]
    code = client.call("GET", f"{path}/coderef")
    _say(json.dumps({**build, "statuses": statuses, "code_reference": code}, indent=2)
         if args.json else _describe(build, statuses, code))
    return 0


def _stop_build(client, project, args):
    build = client.call("POST", f"{project}/builds/{args.id}/stop")
    _say(json.dumps(build, indent=2) if args.json else
         f"build {build['id']} of {build['project']}: {build['last_status']}")
    return 0


def _show_log(client, project, args):
    client.follow(f"{project}/builds/{args.id}", sys.stdout.buffer, live=args.follow)
    return 0


def _not_text(args):
    """The first option whose value holds bytes that are no UTF-8 (Python
    keeps them as lone surrogates), as its flag; else None."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if any(isinstance(part, str) and not _is_text(part)
                   for part in (item if isinstance(item, tuple) else [item])):
                return "--" + name.rstrip("_").replace("_", "-")
    return None


def _say(text):
    """Print `text` now: output that cannot be written (a full disk) is then
    the command's failure to write (EXIT_OUTPUT_FAILED), seen in time."""
    try:
        _print_fully(sys.stdout, text)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputFailed(e, "the output") from None


def _print_fully(stream, text):
    """print(text) to the text stream `stream`, all of it (see _write_fully)."""
    if not hasattr(stream, "buffer"):  # (a StringIO, say: embedded)
        return print(text, file=stream, flush=True)
    stream.flush()
    _write_fully(stream.buffer, f"{text}\n".encode(stream.encoding, stream.errors))


def _write_fully(out, data):
    """Write and flush all of `data` to the binary stream `out`. A pipe made
    non-blocking by whatever shares it (a CI runner) takes part of it, or
    nothing: wait for room, or the rest would be lost without a word."""
    while data:
        try:
            written = out.write(data)  # None: none of it (an unbuffered stream)
        except BlockingIOError as e:  # (a buffered stream: some of it, maybe)
            data = data[e.characters_written:]
            written = None  # (so: wait)
        if written is None:
            _wait_for_room(out)
        else:
            data = data[written:]
    while True:
        try:
            return out.flush()
        except BlockingIOError:
            _wait_for_room(out)


def _wait_for_room(out):
    select.select([], [out], [])  # no timeout: as a blocking write, it waits for its reader


def _settle_output():
    """Flush standard output and error before exiting; one that cannot take
    what it holds (a full disk, `2>/dev/full`) is pointed at /dev/null, or
    Python's own flush at exit would fail again and make the exit code 120.
    (The failure was told, or, on standard error, is no failure.)"""
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # closed when it started (`>&-`)
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # ValueError: closed
            _to_devnull(stream)


def _to_devnull(stream):
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def _output_failed(error, what):
    """The exit for output that cannot be written: quietly, as a tool ended by
    SIGPIPE, when the reader went away (`| head`); else saying why."""
    if isinstance(error, BrokenPipeError):
        _to_devnull(sys.stdout)  # so exiting does not flush into the pipe
        return EXIT_OUTPUT_CLOSED
    return _fail(f"cannot write {what}: {error.strerror or error}", EXIT_OUTPUT_FAILED)


RUN_FLAG_OF_FIELD = {"tags": "tag"}  # the create's fields that `run` takes by another name


def _run_build(client, project, args):
    """`run`: create a build, follow its log, exit with its result."""
    body = {"command": args.command_, "name": args.name, "timeout": args.timeout,
            "env": dict(args.env) if args.env else None, "tags": args.tag}
    code = {"commit": args.commit, "branch": args.branch, "git_url": args.git_url}
    code = {k: v for k, v in code.items() if v is not None}
    try:  # checked before the build exists (the code reference is recorded just
        # after its creation), as the command line
        validate({k: v for k, v in body.items() if v is not None}, BUILD_CREATE)
        validate(code, CODE_REFERENCE)
    except ApiError as e:
        return _fail("; ".join(f"--{RUN_FLAG_OF_FIELD.get(name, name).replace('_', '-')} "
                               f"{re.sub(r', or null.*', '', reason)}"
                               for name, reason in e.errors.items()), 2)
    empty = [name for name, value in code.items() if value == ""]
    if empty:  # the API takes "" for none; here it is a variable unset, a git command failed
        return _fail(f"--{empty[0].replace('_', '-')} is empty (an unset variable, or a "
                     "command that failed?)", 2)
    if args.json and not args.no_follow and sys.stderr is None:  # (before a build is made)
        raise OutputFailed(OSError("standard error is closed"), "the log")
    if args.stop_on_interrupt:  # a CI job cancelled, `timeout`, a closed terminal: as Ctrl-C
        _take_interrupts()
    made = path = None
    try:
        # Only what was given (an empty command is refused, not taken for none).
        build = made = client.call("POST", f"{project}/builds",
                                   {k: v for k, v in body.items() if v is not None})
        path = f"{project}/builds/{build['id']}"
        _note(f"build {build['id']}: {client.url}/#/{args.project}/builds/{build['id']}")
        if code:
            client.call("POST", f"{path}/coderef", code)
        if args.no_follow:
            _say(json.dumps(build, indent=2) if args.json else build["id"])
            return 0
        # With --json, standard output holds the build's JSON alone.
        out = _LineKeeper((sys.stderr if args.json else sys.stdout).buffer)
        build = client.follow(path, out)
    except (Unreachable, ClientError) as e:
        if isinstance(e, ClientError) and (made is None or e.status not in GATEWAY_ERRORS):
            if made is not None:  # (a token replaced meanwhile): a script must not run it again
                e.detail += f"\n{_whereabouts(made, args)}"
            raise  # refused
        if made is None and not isinstance(e, AnswerLost):
            raise  # nothing was made
        return _fail(f"{e}\n{_whereabouts(made, args)}", EXIT_UNKNOWN)
    except (KeyboardInterrupt, Terminated) as interrupt:
        _INTERRUPTED.append(interrupt)  # (a Ctrl-C's: see _terminated)
        _let_go_of_later_signals()
        _interrupted(client, args, made, path)
        return 128 + interrupt.args[0] if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    except OutputFailed as e:  # the log cannot be written (a full disk): the build runs on
        code = _output_failed(e.error, e.what)
        if made is not None and code == EXIT_OUTPUT_FAILED:
            _note(f"build {made['id']} runs on; stop it with: "
                  f"{_again(args, 'stop', args.project, str(made['id']))}")
        return code
    # Each on a line of its own, also after a log whose last line has no end (`printf 100%`).
    if args.json:
        _say(out.apart_on(sys.stdout) + json.dumps(build, indent=2))
    why = "" if build["last_status"] == "succeeded" else _why(client, path, build["last_status"])
    _note(f"{out.apart_on(sys.stderr)}build {build['id']}: {build['last_status']}{why}")
    return client_exit_code(build)


def _interrupted(client, args, build, path):
    """After Ctrl-C or SIGTERM to `run`: stop `build` (at `path`; None: not
    made yet, or not known to be) if told or asked to, and say what became of it."""
    if build is None:
        _note(f"interrupted while the build was being made: {_whereabouts(None, args)}")
        return
    if not (args.stop_on_interrupt or _ask(f"\nStop build {build['id']}? [y/N] ")):
        _note(f"build {build['id']} runs on; stop it with: "
              f"{_again(args, 'stop', args.project, str(build['id']))}")
        return
    try:  # (a second Ctrl-C ends it; a second SIGTERM or SIGHUP is let go: see _terminated)
        client.call("POST", f"{path}/stop")
        _note(f"build {build['id']}: stop requested")
    except (Unreachable, ClientError) as e:
        _note(f"build {build['id']}: its stop could not be asked for ({e}); it may run on")


def _whereabouts(build, args):
    """What is known of a build whose outcome `run` cannot tell."""
    if build is None:
        return (f"the build may have been made: see `{_again(args, 'builds', args.project)}` "
                "before you run it again")
    return (f"build {build['id']} was made, and may still run: see "
            f"`{_again(args, 'status', args.project, str(build['id']))}`")


def _again(args, *words):
    """A command line to paste for another client command: this file as it
    was run (through python3 unless it can run itself), and a --url that
    the environment does not give."""
    me = sys.argv[0]
    runs_itself = (os.sep in me and os.access(me, os.X_OK)) or shutil.which(me) == me
    url = ["--url", args.url] if args.url != _env("url", DEFAULT_URL) else []
    return shlex.join([*([] if runs_itself else ["python3"]), me, *words, *url])


def _why(client, path, status):
    """ (what its last status says), when it says something; best effort.
    (Not its `status: ` again, as a shutdown's `stopped: the server shut down`.)"""
    with contextlib.suppress(Unreachable, ClientError, KeyError, TypeError, AttributeError):
        last = client.call("GET", f"{path}/statuses?limit=1000")["results"][-1]
        said = (last["message"] or "").removeprefix(f"{status}: ")
        if said:
            return f" ({_printable(said)})"
    return ""


class _LineKeeper:
    """A binary output that remembers whether what went through it ends a line."""

    def __init__(self, out):
        self.out, self.ends_line = out, True

    def write(self, data):
        if data:
            self.ends_line = data.endswith(b"\n")
        return self.out.write(data)

    def flush(self):
        self.out.flush()

    def fileno(self):
        return self.out.fileno()

    def apart_on(self, stream):
        """A newline to start a line on `stream` with, if it writes where
        this output left one open; the line written there is then ended."""
        if self.ends_line or not _same_place(self.out, stream):
            return ""
        self.ends_line = True
        return "\n"


def _same_place(out, err):
    """Whether text on `err` lands right after what `out` wrote: one file, or
    two terminals (most likely one screen)."""
    try:
        a, b = os.fstat(out.fileno()), os.fstat(err.fileno())
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (out.isatty() and err.isatty())
    except (AttributeError, OSError, ValueError):  # closed, or no file (a test's StringIO)
        return False


class Terminated(BaseException):  # as KeyboardInterrupt: no `except Exception` takes it
    """SIGTERM or SIGHUP, to `run --stop-on-interrupt`; args: the signal's number."""


_INTERRUPTED = []  # once `run` was interrupted (Ctrl-C, SIGTERM, SIGHUP): what by


def _terminated(signum, frame):
    """Raise Terminated, unless `run` was interrupted already: a closed
    terminal sends SIGHUP twice (the kernel, then the shell to its jobs),
    `timeout` SIGTERM twice (the child, then its group), a user may press
    Ctrl-C and then close the terminal, and the later signal must not cut
    short the stop the first asked for."""
    if not _INTERRUPTED:
        _INTERRUPTED.append(signum)
        raise Terminated(signum)


def _let_go_of_later_signals():
    """Once `run` was interrupted, ignore SIGTERM and SIGHUP where _terminated
    took them: it lets them go anyway, but Python, as it exits, puts back the
    default of each signal it handled, and a second signal that came late (on
    a busy machine) then ended `run` by the signal, not with its exit code."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is _terminated:
            signal.signal(signum, signal.SIG_IGN)


def _take_interrupts():
    """For `run --stop-on-interrupt`: Ctrl-C even where whatever started it
    ignores SIGINT (a script's `&`), SIGTERM, and SIGHUP (a terminal or an ssh
    session that closed) unless ignored on purpose (nohup), each to stop the build."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminated)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _terminated)


def _note(text):
    """Say `text` on standard error, if it can be written: a note, not output
    (a full disk there must not change the exit code, nor end the follow).
    As a terminal may show it: what a server, a proxy or the network said
    may hold escapes."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError):
            _print_fully(sys.stderr, "\n".join(map(_printable, text.split("\n"))))


def _ask(question):
    if sys.stderr is None or not (sys.stdin and sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    try:  # asked on standard error: standard output holds the log (or JSON) alone
        sys.stderr.write(question)
        sys.stderr.flush()
        return input().strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        return False


def _client_parsers(commands):
    """The client commands' arguments."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=_env("url", DEFAULT_URL),
                        help="the server (env BUILDSERVER_URL; default %(default)s)")
    common.add_argument("--token", help="your token; better set BUILDSERVER_TOKEN, which "
                                        "stays out of shell history and ps")
    scripted = argparse.ArgumentParser(add_help=False, parents=[common])
    scripted.add_argument("--json", action="store_true", help="print JSON for scripts")

    def add(name, text, json_too=True, **more):
        return commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                                   parents=[scripted if json_too else common], **more)

    r = add("run", "trigger a build, follow its log, and exit with its result "
                   "(with --json the log goes to standard error)", epilog=RUN_EXIT_CODES,
            formatter_class=_KeepsTables)
    r.add_argument("project", type=_project_spec, metavar="USER/PROJECT")
    r.add_argument("--command", dest="command_", metavar="CMD",
                   help="the shell command (default: the project's)")
    r.add_argument("--env", type=_env_pair, action="append", metavar="NAME=VALUE",
                   help="an environment variable for the build (repeatable)")
    r.add_argument("--name", help="the build's name")
    r.add_argument("--tag", action="append", help="a tag (repeatable)")
    r.add_argument("--timeout", type=int, help="seconds before the build is stopped and fails")
    r.add_argument("--commit", metavar="SHA", help="the git commit the build is made from "
                                                   "(recorded as its code reference)")
    r.add_argument("--branch", help="the git branch, recorded as the build's code reference")
    r.add_argument("--git-url", metavar="URL", help="the repository, recorded likewise")
    r.add_argument("--no-follow", action="store_true", help="print the build's id and return")
    r.add_argument("--stop-on-interrupt", action="store_true",
                   help="on Ctrl-C, SIGTERM or SIGHUP, stop the build without asking")
    s = add("status", "a build's fields and status history (default: the latest build)")
    s.add_argument("project", type=_project_spec, metavar="USER/PROJECT")
    s.add_argument("id", nargs="?", type=int, help="the build's id")
    lg = add("logs", "print a build's log (as it is: no --json)", json_too=False)
    lg.add_argument("project", type=_project_spec, metavar="USER/PROJECT")
    lg.add_argument("id", type=int)
    lg.add_argument("--follow", "-f", action="store_true", help="until the build ends")
    st = add("stop", "stop a build")
    st.add_argument("project", type=_project_spec, metavar="USER/PROJECT")
    st.add_argument("id", type=int)
    b = add("builds", "list a project's builds, newest first")
    b.add_argument("project", type=_project_spec, metavar="USER/PROJECT")
    b.add_argument("--status", type=_statuses, help="only these statuses, comma-separated")
    b.add_argument("--limit", type=_positive(int, most=PAGE_MAX, least=1), default=20,
                   help=f"how many (default %(default)s, at most {PAGE_MAX})")
    b.add_argument("--offset", type=_positive(int), default=0,
                   help="how many of the newest to pass over (default %(default)s)")


def _statuses(text):
    """--status: known statuses, comma-separated (spaces around them and
    empty ones let go: `--status "$S"` with S unset lists them all)."""
    if not _is_text(text):
        return text  # (which _not_text names)
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in STATUSES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown status {unknown[0]!r}: use {', '.join(STATUSES)}")
    return ",".join(chosen)


###############################################################################
# Command line ################################################################
###############################################################################

SERVER_COMMANDS = ("serve", "adduser", "token", "backup")
CLIENT_COMMANDS = ("run", "status", "logs", "stop", "builds")


class _FromEnvironment(str):
    """A value read from the environment: what is wrong with it names the
    variable (argparse names the option, which was never given)."""
    variable = ""


def _env(name, default):
    variable = f"BUILDSERVER_{name.upper()}"
    if variable not in os.environ:
        return default
    value = _FromEnvironment(os.environ[variable])
    value.variable = variable
    return value


def _setting(name):
    """A `serve` flag's default: BUILDSERVER_<NAME>, else Config's, as text
    (argparse parses a text default as it would the flag)."""
    default = getattr(Config, name)
    return _env(name, f"{default:g}" if isinstance(default, float) else str(default))


def _from_where(text):
    """ (from BUILDSERVER_...) for a value read from the environment."""
    return f" (from {text.variable})" if isinstance(text, _FromEnvironment) else ""


def _says_where(parse):
    """An argparse type whose errors name the variable a default came from."""
    @functools.wraps(parse)
    def parse_naming_its_source(text):
        try:
            return parse(text)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e}{_from_where(text)}") from None
    return parse_naming_its_source


def _positive(kind, most=None, least=0):
    @_says_where
    def parse(text):
        try:
            if not text.isascii():  # int() takes other scripts' digits: "１２" for 12
                raise ValueError(text)
            value = kind(text)
        except ValueError:  # (argparse would say "invalid parse value")
            raise argparse.ArgumentTypeError(
                f"must be a {'whole ' if kind is int else ''}number: {text}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number: {text}")
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}: {text}" if least
                                             else f"must not be negative: {text}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most}: {text}")
        return value
    return parse


@_says_where
def _ip_address(text):
    """An IP address (waitress compares it with the connection's; "*" would
    trust everyone, and a host name would never match)."""
    if not text:
        return ""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an IP address, like 127.0.0.1: {text}") \
            from None


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, unless it has none (an empty one)."""

    def _get_help_string(self, action):
        return action.help if action.default == "" else super()._get_help_string(action)


class _KeepsTables(argparse.HelpFormatter):
    """Text wrapped as usual, but for a table (lines indented), kept as it is."""

    def _fill_text(self, text, width, indent):
        if "\n  " in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """Its errors never show a token: `--token T` in the wrong place was
    quoted whole as an unrecognized argument, into a CI job's log."""

    def error(self, message):  # (--tok, --t: argparse takes abbreviations)
        super().error(re.sub(r"(--t(?:o(?:k(?:en?)?)?)?[ =])\S+", r"\1<hidden>", message))


def parser():
    p = _Parser(prog="buildserver.py", description=__doc__.split("\n")[0],
                                formatter_class=_Defaults,
                                epilog="Without a command it serves: `buildserver.py --port 9000` "
                                       "is `buildserver.py serve --port 9000` (see serve --help).")
    # The schema too: which files a release can use (see README, "Upgrading") goes by it.
    p.add_argument("--version", action="version",
                   version=f"{__version__} (database schema {SCHEMA_VERSION})")
    commands = p.add_subparsers(dest="command", metavar="COMMAND")
    s = commands.add_parser("serve", help="run the server (the default command)",
                            formatter_class=_Defaults,
                            description="Run the server. Every flag can also be set with "
                                        "BUILDSERVER_<FLAG>, e.g. BUILDSERVER_PORT=9000.")
    s.add_argument("--host", default=_setting("host"), help="address to listen on")
    s.add_argument("--port", type=_positive(int, 65535), default=_setting("port"),
                   help="port to listen on (0: any free port)")
    _data_dir_option(s, "folder of the database and the build workspaces")
    s.add_argument("--workers", type=_positive(int, 256), default=_setting("workers"),
                   help="builds run at once (0: none run, they wait scheduled)")
    s.add_argument("--threads", type=_positive(int, 1024, least=4), default=_setting("threads"),
                   help="HTTP threads (at least 4); log followers may use all but a reserve")
    s.add_argument("--stop-grace", type=_positive(float, 86400), default=_setting("stop_grace"),
                   help="seconds between SIGTERM and SIGKILL when a build is stopped")
    s.add_argument("--max-log-bytes", type=_positive(int, 2 ** 40),
                   default=_setting("max_log_bytes"),
                   help="bytes of log kept per build; later output is dropped")
    s.add_argument("--auth-burst", type=_positive(int, 10 ** 6), default=_setting("auth_burst"),
                   help="failed authentications per client address and minute before "
                        "the address gets 429 (0: no limit)")
    s.add_argument("--trusted-proxy", metavar="ADDRESS", type=_ip_address,
                   default=_setting("trusted_proxy"),
                   help="the reverse proxy's address (e.g. 127.0.0.1): its X-Forwarded-For, "
                        "-Proto, -Host and -Port headers are believed")
    for name, text in (("adduser", "create a user and print its token"),
                       ("token", "give a user a new token (the old ones stop working)")):
        c = commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                                formatter_class=_Defaults)
        c.add_argument("name", help="the user's name")
        if name == "adduser":
            c.add_argument("--admin", action="store_true", help="may act in every namespace")
        _data_dir_option(c, "folder of the database")
    b = commands.add_parser("backup", help="copy the database safely, even while it serves",
                            formatter_class=_Defaults,
                            description="Copy the database with SQLite's online backup, "
                                        "consistent even while the server writes to it.")
    b.add_argument("dest", help="the file to write (replaced if it exists)")
    _data_dir_option(b, "folder of the database")
    _client_parsers(commands)
    return p


def _data_dir_option(parser, text):
    @_says_where
    def folder(path):
        if not path:
            raise argparse.ArgumentTypeError("must name a folder, not be empty")
        return path
    parser.add_argument("--data-dir", type=folder, default=_setting("data_dir"),
                        help=text)


def with_command(argv):
    """`argv` with its command first: `serve` unless it names another."""
    commands = SERVER_COMMANDS + CLIENT_COMMANDS
    if not argv or (argv[0] not in commands and argv[0] not in ("-h", "--help", "--version")):
        return ["serve"] + argv
    return argv


def serve_as_module():
    """Replace this process with a fresh Python that runs this file as a
    module; returns only when it cannot.

    CPython keeps the syntax tree of the script it was started with until the
    script ends: for `python buildserver.py` that is the server's whole life,
    and about 6 MB of this file's tree. A module's tree is freed once it is
    compiled. The process keeps its pid, files and environment (systemd sees
    nothing); it costs one more start of Python.
    """
    started_as = getattr(sys, "orig_argv", [])  # (3.10+) e.g. python3 -X utf8 <file> serve
    options = started_as[1:len(started_as) - len(sys.argv)]
    if (not sys.executable or bottle is None or started_as[-len(sys.argv):] != sys.argv
            or os.path.abspath(sys.argv[0]) != os.path.abspath(__file__)
            or not all(o.startswith("-") or (i and options[i - 1] in ("-X", "-W"))
                       for i, o in enumerate(options))):
        return  # not python itself running this file (embedded, runpy, coverage run)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    with contextlib.suppress(OSError):
        os.execv(sys.executable, [sys.executable, *options, "-c", MODULE_LAUNCHER,
                                  os.path.abspath(__file__), *sys.argv[1:]])


def _no_database(db_path):
    """Why there is no database this user can use at `db_path`, or None."""
    try:
        os.stat(db_path)
    except FileNotFoundError:
        return f"there is no database at {db_path}"
    except NotADirectoryError:
        return f"there is no database at {db_path}: {os.path.dirname(db_path)} is no folder"
    except OSError as e:  # a data folder private to the server's user, say
        return f"cannot reach the database at {db_path} ({e.strerror}): run this as its owner"
    return None


PARTIAL_BACKUP = ".buildserver-backup."  # then pid, _dest_tag, _copy_tag, a random part


def backup(db_path, dest):
    """Copy the database at `db_path` to `dest` with SQLite's online backup API."""
    refused = _no_database(db_path) or _unfit_destination(db_path, dest)
    if refused:
        return _fail(refused, 2)
    where = os.path.dirname(os.path.abspath(dest))
    # A copy of its own beside the destination (0600, like the database), in
    # a folder of its own (0700: made by this process, so no other user can
    # have put a file of theirs there to receive the copy), named after this
    # process: the next backup removes what a killed one left.
    import tempfile
    for signum in (signal.SIGTERM, signal.SIGHUP):  # (an ssh session closed): as Ctrl-C
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))  # (cleans up)
    _remove_dead_copies(where, dest)
    try:
        folder = tempfile.mkdtemp(
            prefix=f"{PARTIAL_BACKUP}{os.getpid()}.{_dest_tag(dest)}.{_copy_tag()}.",
            suffix=".partial", dir=where)
    except OSError as e:
        return _fail(f"cannot write in {where}: {e.strerror or e}", 1)
    partial = os.path.join(folder, "copy.db")
    _create_private(partial)
    try:
        check = _copy_database(db_path, partial)
        if check != "ok":
            return _fail(f"the copy failed its integrity check: {check}", 1)
        _mark_as_backup(partial)
        os.replace(partial, dest)
    except sqlite3.Error as e:  # a full disk at the destination, say
        return _fail(f"the copy to {dest} failed: {e}", 1)
    except KeyboardInterrupt:
        return _fail(f"interrupted: {dest} was not written", EXIT_INTERRUPTED)
    finally:
        _remove_copy(folder)
    print(f"Backed up {db_path} to {dest} ({os.path.getsize(dest)} bytes).")
    return 0


def _unfit_destination(db_path, dest):
    """Why `backup` must not write to `dest`, or None."""
    if not dest.strip():  # ("$DEST" unset): the folder above the current one was checked
        return "no file to write was named (the destination is empty)"
    if os.path.isdir(dest) or dest.endswith(os.sep):
        return f"{dest} is a folder: name the file to write, e.g. {os.path.join(dest, DB_FILE)}"
    where = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(where):
        return f"there is no folder {where}"
    if _others_may_rename_in(where):
        # They could rename the copy's folder away and put one of theirs in its
        # place, to receive the copy (every token's hash, env and log).
        return (f"other users may write in {where} (mode {os.stat(where).st_mode & 0o777:03o}): "
                "they could take or change the copy; name a file in a folder of yours (or in "
                "one with the sticky bit, as /tmp)")
    # SQLite keeps its -wal and -shm beside the database a link leads to.
    if _names_one_of(dest, [base + suffix for base in (db_path, os.path.realpath(db_path))
                            for suffix in ("", "-wal", "-shm", "-journal")]):
        # The copy would replace the file a running server writes: what it
        # answered for afterwards would be lost.
        return (f"{dest} is the database itself (or one of its files): "
                "name a file outside the data folder")
    if _names_one_of(dest, _serve_locks(os.path.dirname(db_path))):
        return (f"{dest} is the lock that keeps a second server off the data folder: "
                "name a file outside the data folder")
    if os.path.lexists(dest) and not stat.S_ISREG(os.lstat(dest).st_mode):
        # The copy replaces what is there: /dev/null or /dev/stdout would be
        # replaced by a file for every user, a link by a copy.
        return (f"{dest} is not a file (a device, a pipe or a link, say): "
                "name a file to write, or a new one")
    return None


def _copy_database(db_path, path):
    """Copy the database to the new file at `path`; the copy's integrity check."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as source, \
            contextlib.closing(sqlite3.connect(path)) as target:
        source.backup(target)
        return target.execute("PRAGMA integrity_check").fetchone()[0]


def _mark_as_backup(path):
    """Write into the copy at `path` when it was taken (see Store.backup_taken)."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as copy:
        copy.execute("BEGIN IMMEDIATE")
        # schema.sql's migration 10: a database this release has not yet
        # started on (an older release's) may lack the table.
        copy.execute("CREATE TABLE IF NOT EXISTS backup_taken (taken_at TEXT NOT NULL)")
        copy.execute("DELETE FROM backup_taken")
        copy.execute("INSERT INTO backup_taken (taken_at) VALUES (?)", (now_iso(),))
        copy.execute("COMMIT")


def _names_one_of(path, others):
    """Whether `path` names one of `others`, through any link or relative path."""
    real = os.path.realpath(path)
    for other in others:
        if real == os.path.realpath(other):
            return True
        with contextlib.suppress(OSError):
            if os.path.samefile(path, other):  # a hard link
                return True
    return False


def _remove_copy(partial):
    """A partial backup's folder, or (an older release's) file with the files
    SQLite keeps beside it."""
    if os.path.isdir(partial) and not os.path.islink(partial):
        shutil.rmtree(partial, ignore_errors=True)
        return
    for path in (partial, partial + "-journal", partial + "-wal", partial + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _dest_tag(dest):
    """A short mark of a backup's destination, in its partial copy's name."""
    return hashlib.sha256(os.path.basename(dest).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _copy_tag():
    """The part of a partial copy's name that says where its pid counts: this
    boot of this machine's kernel (every machine's first pid namespace has
    the same number) and the pid namespace. (A dated backup's next night goes
    to another name: what a killed run left is judged by this alone.)"""
    namespace, boot = _pid_namespace(), _read("/proc/sys/kernel/random/boot_id").strip()
    if not (namespace and boot):
        return "ns-"
    return "ns" + hashlib.sha256(boot + b"/" + namespace.encode()).hexdigest()[:12]


def _remove_dead_copies(where, dest):
    """The partial copies in the folder `where` (and older releases' beside
    `dest`) whose backup process is gone (killed): those to `dest`, and to
    other destinations those made in this pid namespace since this machine
    started (the pids of another, a container's or another machine's on a
    shared disk, may look dead here and be alive there)."""
    import glob
    ours = _dest_tag(dest), _copy_tag()
    start = os.path.join(where, PARTIAL_BACKUP)
    for path in glob.glob(glob.escape(start) + "*.partial"):
        pid, tag, made_in, *_ = path[len(start):].split(".") + ["", ""]
        if tag == ours[0] or made_in == ours[1] != "ns-":
            _remove_if_dead(path, pid)
    for path in glob.glob(glob.escape(dest + ".") + "*.partial"):  # an older release's
        _remove_if_dead(path, path[len(dest) + 1:].split(".", 1)[0])


def _remove_if_dead(path, pid):
    if pid.isdigit() and not _alive(int(pid)):
        _remove_copy(path)


def _others_may_rename_in(folder):
    """Whether users other than this one may rename what is in `folder`: others,
    or a group that holds anyone else, may write there, and it has no sticky bit."""
    info = os.stat(folder)
    if info.st_mode & stat.S_ISVTX or not info.st_mode & 0o022:
        return False
    # With an ACL the group's bits are the most any named user or group gets.
    return bool(info.st_mode & 0o002) or not _group_of_one(info.st_gid) or _has_acl(folder)


def _has_acl(path):
    try:
        return bool(os.getxattr(path, "system.posix_acl_access"))
    except (AttributeError, OSError):  # none (ENODATA), or no ACLs here
        return False


def _group_of_one(gid):
    """Whether group `gid` holds this user alone (a user's private group, in
    which systems with umask 002 make every folder group-writable)."""
    try:
        import grp
        import pwd
        me = pwd.getpwuid(os.getuid())
        members = grp.getgrgid(gid).gr_mem
    except (ImportError, KeyError):  # no such group: no telling
        return False
    return all(name == me.pw_name for name in members) and all(
        user.pw_uid == me.pw_uid for user in pwd.getpwall() if user.pw_gid == gid)


def manage_users(args):
    """`adduser` and `token`: the token is the last line of standard output."""
    if not valid_name(args.name):
        return _fail(f"{args.name!r} is not a valid user name: use 1 to 64 letters, digits, "
                     "'_' or '-', starting with a letter or digit", 2)
    if args.name in RESERVED_USERNAMES:
        return _fail(f"{args.name!r} cannot be a user name: /api/v1/{args.name} is an endpoint", 2)
    db_path = os.path.join(args.data_dir, DB_FILE)
    if args.command == "token" and (missing := _no_database(db_path)):  # a mistyped --data-dir
        return _fail(missing, 2)
    _make_private_dir(args.data_dir)
    new = not os.path.exists(db_path)
    if not new and _served(args.data_dir) and _version(db_path) < SCHEMA_VERSION:
        # An older server's: upgraded under it, the file would be refused at its next start.
        return _fail(f"a server of an older buildserver is using {args.data_dir}: upgrade it "
                     "first (this would upgrade its database under it), or use its own "
                     "buildserver.py", 1)
    db = Database(db_path)
    try:
        db.migrate()
        store = Store(db)
        if new:  # a server that runs elsewhere (--data-dir forgotten) would refuse its token
            _note(f"buildserver: there was no database in {os.path.abspath(args.data_dir)}: "
                  "made a new one (a server on another --data-dir will not know this user)")
        # The token is shown first, then recorded: one that cannot be shown is
        # never made, and a print that blocks (a paused terminal) holds no lock.
        token = fresh_token()
        if args.command == "adduser":
            same = store.user_named_any_case(args.name)
            if same is not None:  # (a name differing only in case would share a folder)
                return _fail(f"the user {same['name']!r} exists already", 2)
            _show_token(f"Created the user {args.name!r}{' (admin)' if args.admin else ''} "
                        f"in {os.path.abspath(args.data_dir)}. Its token, shown only now:", token)
            try:
                made = store.create_user(args.name, is_admin=args.admin, token=token)
            except sqlite3.Error as e:
                return _fail(f"{_unrecorded(args.data_dir, e)}; the user was not made", 1)
            if made is None:
                return _fail(f"the user {args.name!r} was made meanwhile by another command; "
                             "the token above was not recorded", 2)
        else:
            user = store.user_by_name(args.name)
            if user is None:
                return _fail(f"there is no user {args.name!r}", 2)
            _show_token(f"New token for {args.name!r}; the earlier ones no longer work:", token)
            try:
                store.new_token(user["id"], token)
            except sqlite3.Error as e:
                return _fail(f"{_unrecorded(args.data_dir, e)}; the earlier ones still work", 1)
        return 0
    except OutputFailed as e:
        return _fail(f"cannot show {e.what}: {e}", EXIT_OUTPUT_FAILED)
    finally:
        db.close()


def _unrecorded(data_dir, error):
    """What to say when a token shown already could not be recorded (a full disk)."""
    return f"cannot use the database in {data_dir}: {error}: the token above was not recorded"


def _serve_locks(data_dir):
    """The locks a server holds: its folder's (which older releases hold
    alone), and, when its database is a link, that of the data folder the
    link leads to (a second data folder linked to it must not take the first
    for crashed), or beside a file named otherwise, which only links reach,
    its own."""
    real = os.path.realpath(os.path.join(data_dir, DB_FILE))
    linked = os.path.join(os.path.dirname(real), SERVE_LOCK) \
        if os.path.basename(real) == DB_FILE else f"{real}-{SERVE_LOCK}"
    own = os.path.join(data_dir, SERVE_LOCK)
    return [own] if os.path.realpath(own) == os.path.realpath(linked) else [own, linked]


def _served(data_dir):
    """Whether a server holds the data folder (one of its serve locks)."""
    import fcntl
    for path in _serve_locks(data_dir):
        try:
            with open(path, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # none: no server ever started there
            pass
    return False


def _version(db_path):
    """The schema version of the database file at `db_path`."""
    with contextlib.closing(sqlite3.connect(_file_uri(db_path, "ro"), uri=True,
                                            timeout=30)) as conn:
        return conn.execute("PRAGMA user_version").fetchone()[0]


def _show_token(*lines):
    """Print a token before it is recorded, or raise OutputFailed: no token
    exists that nobody saw."""
    try:
        if sys.stdout is None:  # closed (`>&-`): print() would say nothing
            raise OSError("standard output is closed")
        print(*lines, sep="\n", flush=True)
    except OSError as e:
        raise OutputFailed(e, "the token") from None


def _fail(message, code):
    """Say why on standard error; returns `code`."""
    _note(f"buildserver: {message}")
    return code


def main(argv=None):
    argv = with_command(sys.argv[1:] if argv is None else list(argv))
    args = parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a name a Latin-1 terminal cannot show: d\u2713
        with contextlib.suppress(AttributeError):  # (None, or no text file: embedded)
            stream.reconfigure(errors="backslashreplace")
    try:
        if args.command == "serve":
            _take_stop_signals(lambda signum, frame: _early_signals.append(signum))
            _hold_stop_signals(False)  # (held while this process replaced itself)
            logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            # A line per request: skip what the format never shows (the logging
            # HOWTO's "Optimization": caller lookup, thread and process names).
            logging._srcfile = None
            logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
            if bottle is None:
                return _fail("the server needs bottle and waitress: "
                             "pip install -r requirements.txt", 1)
            return serve(Config(**{field.name: getattr(args, field.name)
                                   for field in dataclasses.fields(Config)}))
        if args.command in CLIENT_COMMANDS:
            return run_client(args)
        if args.command == "backup":
            return backup(os.path.join(args.data_dir, DB_FILE), args.dest)
        return manage_users(args)
    except (SchemaError, UnsafeDataFolder) as e:
        return _fail(str(e), 1)
    except sqlite3.Error as e:
        return _fail(f"cannot use the database in {args.data_dir}: {e}", 1)
    except OSError as e:
        unnamed = getattr(args, "data_dir", None) == Config.data_dir  # (a command's default)
        return _fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": ") + (
            f" ({Config.data_dir}, in this folder, is the default data folder: "
            "is a --data-dir missing?)" if unnamed else ""), 1)
    finally:
        _settle_output()


MODULE_LAUNCHER = (  # python -c, with argv: <this file> <its arguments>
    "import os, sys, importlib.machinery as m, importlib.util as u; "
    "sys.argv[0] = sys.argv.pop(1); l = m.SourceFileLoader('buildserver', sys.argv[0]); "
    "sys.path[:1] = [os.path.dirname(sys.argv[0])] if sys.path[:1] == [''] else sys.path[:1]; "
    "b = sys.modules['buildserver'] = u.module_from_spec(u.spec_from_loader(l.name, l)); "
    "l.exec_module(b); sys.exit(b.main())")


if __name__ == "__main__":
    if __spec__ is None and with_command(sys.argv[1:])[0] == "serve":  # a script, not -m
        _hold_stop_signals(True)
        # A build can read its server's environment as it began (in
        # /proc/<pid>/environ): a token exported for the client must not be in it.
        os.environ.pop("BUILDSERVER_TOKEN", None)
        serve_as_module()
    sys.exit(main())
