-- Switchboard message store, schema version 1 (applied by src/store/pg.rs at start, in one
-- transaction, recorded in switchboard_schema_migrations; never edit an applied file: add the
-- next NNNN_name.sql instead).
--
-- Every table is prefixed `switchboard_` so the store can share a database with the service
-- it replaces. User and thread ids are COLLATE "C": byte order, the same as Rust's `str`
-- ordering, and memcmp instead of locale comparison in every index.

-- The store-wide id sequence (message ids and thread numeric ids). One row, and every writer
-- that takes ids locks it (SELECT ... FOR NO KEY UPDATE) until its commit: ids are therefore
-- handed out in commit order across connections and nodes, which a PostgreSQL SEQUENCE does
-- not do (nextval is not transactional, so a later-committing writer can hold a smaller id).
CREATE TABLE switchboard_counters (
    name text COLLATE "C" PRIMARY KEY,
    value bigint NOT NULL CHECK (value >= 0)
);
INSERT INTO switchboard_counters (name, value) VALUES ('ids', 0);

-- A thread's newest message and seq are not columns: they are the top of its messages in the
-- (thread_nid, id) index, one probe away. An append therefore only inserts rows and never
-- updates a thread or a participant: keeping a `last_seq` here and a per-user activity key on
-- the participants took 25 ms of a 1024-message batch, against 32 ms for inserting the
-- messages (2-core VM; see src/store/pg.rs).
CREATE TABLE switchboard_threads (
    id text COLLATE "C" PRIMARY KEY,
    numeric_id bigint NOT NULL UNIQUE CHECK (numeric_id > 0),
    kind text NOT NULL CHECK (kind IN ('direct', 'group')),
    title text,
    created_at_ms bigint NOT NULL
);

-- One row per (thread, user), with the user's receipts (the highest seq read and delivered).
CREATE TABLE switchboard_participants (
    thread_nid bigint NOT NULL REFERENCES switchboard_threads (numeric_id),
    user_id text COLLATE "C" NOT NULL,
    read_seq bigint NOT NULL DEFAULT 0,
    delivered_seq bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (thread_nid, user_id)
);
-- A user's threads (thread list, sync).
CREATE INDEX switchboard_participants_user
    ON switchboard_participants (user_id, thread_nid);

CREATE TABLE switchboard_messages (
    id bigint PRIMARY KEY CHECK (id > 0),
    thread_nid bigint NOT NULL REFERENCES switchboard_threads (numeric_id),
    seq bigint NOT NULL CHECK (seq > 0),
    server_msg_id uuid NOT NULL UNIQUE,
    event_id uuid NOT NULL,
    sender text COLLATE "C" NOT NULL,
    -- The DM's `to` as sent (NULL: a message into a group thread).
    recipient text COLLATE "C",
    -- The sender's idempotency key (NULL: never deduplicated; NULLs are distinct in UNIQUE).
    client_msg_id text COLLATE "C",
    content text NOT NULL,
    attachment_url text,
    sent_at_ms bigint NOT NULL,
    -- Gapless per-thread sequence: a second writer of the same seq fails instead of forking.
    UNIQUE (thread_nid, seq),
    -- Durable dedup of retried sends.
    UNIQUE (sender, client_msg_id)
);
-- `sync` (a thread's messages after a cursor, a message id, in id order) and a thread's newest
-- message.
CREATE INDEX switchboard_messages_thread_id ON switchboard_messages (thread_nid, id);

CREATE TABLE switchboard_notifications (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id text COLLATE "C" NOT NULL,
    kind text NOT NULL,
    -- The `data` object's JSON text exactly as given (already validated by the caller); text,
    -- not jsonb, because jsonb rewrites it (`{"n":1}` comes back as `{"n": 1}`). Query it by
    -- hand with `data::jsonb`.
    data text NOT NULL,
    -- Idempotency key from the source (Kafka topic/partition/offset, an API caller's id).
    source_key text COLLATE "C",
    created_at_ms bigint NOT NULL,
    read boolean NOT NULL DEFAULT false,
    UNIQUE (user_id, source_key)
);
CREATE INDEX switchboard_notifications_user ON switchboard_notifications (user_id, id);
CREATE INDEX switchboard_notifications_user_unread
    ON switchboard_notifications (user_id, id) WHERE NOT read;
