-- buildserver's database. Each "-- migration N" section moves a database from
-- PRAGMA user_version N-1 to N, inside one transaction; buildserver.py applies
-- the sections above the file's version on start, so a second start is a no-op.
-- Times are RFC 3339 text in UTC ("2026-11-28T09:15:02.123456Z"): they sort.

-- migration 1
CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    is_admin    INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL
);

-- Only the SHA-256 of a token is kept; the token itself is shown once.
CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  TEXT NOT NULL
);
CREATE INDEX tokens_user ON tokens(user_id);

CREATE TABLE projects (
    id            INTEGER PRIMARY KEY,
    owner_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    description   TEXT,
    command       TEXT,
    env           TEXT NOT NULL DEFAULT '{}',   -- JSON object
    timeout       INTEGER,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    -- Kept as counters so that a page of a huge project never counts its builds,
    -- and so that build numbers are never reused after a delete.
    builds_count  INTEGER NOT NULL DEFAULT 0,
    next_number   INTEGER NOT NULL DEFAULT 1,
    UNIQUE (owner_id, name)
);

CREATE TABLE builds (
    id              INTEGER PRIMARY KEY,        -- global: the dispatch order
    project_id      INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    number          INTEGER NOT NULL,           -- the API's "id": counts from 1 per project
    uuid            TEXT NOT NULL UNIQUE,
    user            TEXT NOT NULL,              -- who created it
    name            TEXT,
    description     TEXT,
    tags            TEXT NOT NULL DEFAULT '[]', -- JSON list
    last_status     TEXT NOT NULL,
    is_managed      INTEGER NOT NULL,
    command         TEXT,
    env             TEXT NOT NULL DEFAULT '{}', -- JSON object, project env merged in
    timeout         INTEGER,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT,
    exit_code       INTEGER,
    log_size        INTEGER NOT NULL DEFAULT 0,
    truncated       INTEGER NOT NULL DEFAULT 0,
    restarted_from  INTEGER,
    pgid            INTEGER,                    -- the process group, for crash recovery
    UNIQUE (project_id, number)
);
CREATE INDEX builds_project_status ON builds(project_id, last_status, number);
CREATE INDEX builds_status ON builds(last_status);

CREATE TABLE statuses (
    id          INTEGER PRIMARY KEY,
    build_id    INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    number      INTEGER NOT NULL,               -- the API's "id": counts from 1 per build
    uuid        TEXT NOT NULL UNIQUE,
    status      TEXT NOT NULL,
    message     TEXT,
    created_at  TEXT NOT NULL,
    UNIQUE (build_id, number)
);

-- A log is stored as it arrives, in chunks of up to LOG_CHUNK bytes; "offset"
-- is the position of the chunk's first byte in the whole log.
CREATE TABLE log_chunks (
    id          INTEGER PRIMARY KEY,
    build_id    INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    offset      INTEGER NOT NULL,
    data        BLOB NOT NULL,
    UNIQUE (build_id, offset)
);

-- migration 2
-- When the build's shell (its process group's leader) started, in clock ticks
-- since boot: after a crash it tells the build's group from a reused pid.
ALTER TABLE builds ADD COLUMN pg_started TEXT;

-- migration 3
-- A status change writes a build's row, its entry in builds_project_status and
-- a status row; every other index it touches is one more page in the WAL. So
-- statuses are kept in their (build_id, number) key alone, with no rowid and
-- no index on uuid (a build's few entries are searched for one), and the index
-- on last_status alone goes: only a server's start looks for unfinished builds
-- across projects, once.
CREATE TABLE statuses_by_build (
    build_id    INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
    number      INTEGER NOT NULL,               -- the API's "id": counts from 1 per build
    uuid        TEXT NOT NULL,
    status      TEXT NOT NULL,
    message     TEXT,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (build_id, number)
) WITHOUT ROWID;
INSERT INTO statuses_by_build (build_id, number, uuid, status, message, created_at)
    SELECT build_id, number, uuid, status, message, created_at FROM statuses;
DROP TABLE statuses;
ALTER TABLE statuses_by_build RENAME TO statuses;
DROP INDEX builds_status;

-- migration 4
-- What Polyaxon's client records of a build beside its run: a bookmark, and
-- the code it was made from (JSON {commit, head, branch, git_url, is_dirty}).
ALTER TABLE builds ADD COLUMN bookmarked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE builds ADD COLUMN code_reference TEXT;

-- migration 5
-- A build's id is never used again once its build is deleted (SQLite would
-- give the next build the id of a deleted newest one): a request that looked
-- a build up must never write to, or show, another build that took its id.
CREATE TABLE build_ids (next INTEGER NOT NULL);
INSERT INTO build_ids SELECT coalesce(max(id), 0) + 1 FROM builds;

-- migration 6
-- Bookmarked builds are listed per user (GET /api/v1/bookmarks/{user}/builds).
-- A partial index holds them alone: no status change or new build touches it.
CREATE INDEX builds_bookmarked ON builds(project_id) WHERE bookmarked = 1;

-- migration 7
-- A project's id is never used again once its project is deleted, as for
-- builds (migration 5): a request that looked a project up, then waited for
-- its builds to stop, must never delete, or add a build to, another user's
-- project that took its id meanwhile.
CREATE TABLE project_ids (next INTEGER NOT NULL);
INSERT INTO project_ids SELECT coalesce(max(id), 0) + 1 FROM projects;

-- migration 8
-- The server process that last started on the database, and the pid
-- namespace its pid means something in (a container has its own). A server
-- started on a copy of a live data folder (a backup restored for staging,
-- say) finds the live one here, still running: the builds its rows call
-- `running` are the live one's, and their processes are not the copy's to kill.
CREATE TABLE server_process (pid INTEGER NOT NULL, started TEXT, pid_namespace TEXT);

-- migration 9
-- No change of its own. Migration 8 was first released without
-- server_process.pid_namespace (in 465c72c), and a file that release made
-- says version 8 all the same: a start adds the column where it is missing
-- (Database._migrate). This number makes that release refuse a file it
-- would misread, as every older one refuses a newer file.

-- migration 10
-- When `backup` made the file: written into the copy alone, so that the
-- first start on it (a restore) ends the builds that waited or ran then,
-- instead of running them again (they may have run since). (First added to
-- migration 9 in place, after 54f2a08 had released it: a file that release
-- made says 9 without this table, hence IF NOT EXISTS.)
CREATE TABLE IF NOT EXISTS backup_taken (taken_at TEXT NOT NULL);
