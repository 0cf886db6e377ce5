"""The library's SQLite schema, as numbered migrations applied in order (PRAGMA user_version)."""
from __future__ import annotations

import sqlite3

from sqlite_utils import Database

from .errors import LibraryError

MIGRATIONS: list[str] = [
    # 1: documents, their pages, memory blocks, checkpoints of an ingest, conversations.
    """
    CREATE TABLE IF NOT EXISTS documents (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        source_name TEXT NOT NULL,       -- the uploaded file's base name; never used as a path
        kind TEXT NOT NULL,              -- pdf | epub | txt | md | html
        sha256 TEXT NOT NULL,            -- of the file's bytes: the same file is recognised
        model_fingerprint TEXT NOT NULL, -- a memory is only used with the model ...
        config_hash TEXT NOT NULL,       -- ... and the engine layout that built it
        config TEXT NOT NULL,            -- the engine config as JSON
        state_file TEXT,                 -- the committed small state (sinks, window, scores)
        status TEXT NOT NULL,            -- reading | ready | failed
        error TEXT,
        pages INTEGER NOT NULL DEFAULT 0,
        tokens INTEGER NOT NULL DEFAULT 0,      -- tokens of the whole document
        read_tokens INTEGER NOT NULL DEFAULT 0, -- tokens in committed memory so far
        n_blocks INTEGER NOT NULL DEFAULT 0,    -- blocks in committed memory so far
        read_seconds REAL NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,       -- memory on disk
        created_at TEXT NOT NULL DEFAULT (datetime('now')),
        UNIQUE (sha256, model_fingerprint, config_hash)
    );
    CREATE TABLE IF NOT EXISTS pages (
        document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        number INTEGER NOT NULL,          -- 1-based, in reading order
        label TEXT NOT NULL,              -- "p. 12" or a chapter title
        start_token INTEGER NOT NULL,
        end_token INTEGER NOT NULL,       -- exclusive
        PRIMARY KEY (document_id, number)
    );
    -- Block i spans the same tokens in every layer; first/last page make the heatmap's x axis.
    CREATE TABLE IF NOT EXISTS blocks (
        document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        block INTEGER NOT NULL,
        start_token INTEGER NOT NULL,
        end_token INTEGER NOT NULL,
        first_page INTEGER NOT NULL,
        last_page INTEGER NOT NULL,
        PRIMARY KEY (document_id, block)
    );
    -- Append-only block files of an ingest, in order; the state file is rewritten at each commit.
    CREATE TABLE IF NOT EXISTS segments (
        document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        file TEXT NOT NULL,
        first_block INTEGER NOT NULL,
        n_blocks INTEGER NOT NULL,
        PRIMARY KEY (document_id, seq)
    );
    CREATE TABLE IF NOT EXISTS conversations (
        id INTEGER PRIMARY KEY,
        document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        title TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL,               -- user | assistant
        content TEXT NOT NULL,
        method TEXT,                      -- infllm | streaming | full, for answers
        trace TEXT,                       -- the retrieval trace as JSON, for answers
        timings TEXT,                     -- JSON
        created_at TEXT NOT NULL DEFAULT (datetime('now'))
    );
    """,
    # 2: the text of each block, for showing retrieved passages; the kept upload, for reading a
    #    document again under other settings.
    """
    ALTER TABLE blocks ADD COLUMN text TEXT;
    ALTER TABLE documents ADD COLUMN upload TEXT;  -- file name under <data>/uploads/: <sha256>.<ext>
    """,
    # 3: rows for the block-sized spans of the local window too (in_memory = 0), numbered after the
    #    memory blocks, so an answer whose evidence was still in the window can cite its page.
    """
    ALTER TABLE blocks ADD COLUMN in_memory INTEGER NOT NULL DEFAULT 1;
    """,
    # 4: segments was never used: block files are append-only and documents.n_blocks says how far.
    """
    DROP TABLE IF EXISTS segments;
    """,
    # 5: how the memory files are laid out (engine.snapshot.FORMAT): 1 = K/V in the compute dtype, as
    #    every document read so far; 2 = packed int8. Reading converts a format-1 memory when it loads.
    """
    ALTER TABLE documents ADD COLUMN memory_format INTEGER NOT NULL DEFAULT 1;
    """,
    # 6: a full-text index of the spans' texts (storage.lexical): the question's words find the spans
    #    that hold them. Its own copy of the text, kept in step by Library.finish, restart and delete.
    """
    CREATE VIRTUAL TABLE span_words USING fts5(text, document_id UNINDEXED, span UNINDEXED,
                                               tokenize = 'porter unicode61');
    INSERT INTO span_words (text, document_id, span)
        SELECT text, document_id, block FROM blocks WHERE text IS NOT NULL;
    """,
    # 7: what an answer's quote and the page view need: the document's text and where each token starts in
    #    it; each page's number in the file, the number printed on it and its characters; the quote shown.
    #    Documents read before have none of them until reading.backfill fills them from the kept file.
    """
    CREATE TABLE IF NOT EXISTS texts (
        document_id INTEGER PRIMARY KEY REFERENCES documents(id) ON DELETE CASCADE,
        text TEXT NOT NULL,              -- the document's text as read (documents.Document.text)
        token_starts BLOB NOT NULL       -- int32 little-endian, one per token: where it starts in text
    );
    ALTER TABLE pages ADD COLUMN physical INTEGER;     -- the PDF's page number, or a chapter's position
    ALTER TABLE pages ADD COLUMN printed TEXT;         -- the number printed on the page ("56", "xii"), if known
    ALTER TABLE pages ADD COLUMN start_char INTEGER;   -- [start_char, end_char) of texts.text
    ALTER TABLE pages ADD COLUMN end_char INTEGER;
    ALTER TABLE messages ADD COLUMN quote TEXT;        -- JSON: the document's sentence shown with an answer
    """,
    # 8: a conversation may ask several documents at once (shelf: "all", or their ids as "1,3"; document_id
    # NULL). SQLite cannot drop a NOT NULL, so the table is rebuilt, with foreign keys off (migrate).
    """
    CREATE TABLE conversations_new (
        id INTEGER PRIMARY KEY,
        document_id INTEGER REFERENCES documents(id) ON DELETE CASCADE,
        shelf TEXT,
        title TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT (datetime('now')),
        CHECK ((document_id IS NULL) != (shelf IS NULL))
    );
    INSERT INTO conversations_new (id, document_id, title, created_at)
        SELECT id, document_id, title, created_at FROM conversations;
    DROP TABLE conversations;
    ALTER TABLE conversations_new RENAME TO conversations;
    """,
    # 9: what earlier versions stored, in today's form, so that every path knows one. What needs the model (a
    #    memory of format 1, the text of a document read before step 7) is flagged for reading.upgrade, which
    #    runs when a service opens the library with that model.
    """
    ALTER TABLE documents ADD COLUMN upgrade INTEGER NOT NULL DEFAULT 0;  -- 1: reading.upgrade has work on it
    UPDATE documents SET upgrade = 1 WHERE memory_format = 1 OR id NOT IN (SELECT document_id FROM texts);
    -- spans read before whole-word spans decoded token spans that could cut a character in two: its halves go
    UPDATE blocks SET text = trim(text, char(65533)) WHERE text LIKE char(65533) || '%' OR text LIKE '%' || char(65533);
    UPDATE messages SET method = 'infllm' WHERE role = 'assistant' AND method IS NULL;
    -- an answer about one document names it in its trace and its quote, as an answer about several does
    UPDATE messages SET trace = json_set(trace, '$.documents', json_array(
            (SELECT document_id FROM conversations c WHERE c.id = messages.conversation_id)))
        WHERE trace IS NOT NULL AND json_extract(trace, '$.documents') IS NULL
          AND (SELECT document_id FROM conversations c WHERE c.id = messages.conversation_id) IS NOT NULL;
    UPDATE messages SET quote = json_set(quote,
            '$.document', (SELECT document_id FROM conversations c WHERE c.id = messages.conversation_id),
            '$.title', (SELECT d.title FROM conversations c JOIN documents d ON d.id = c.document_id
                        WHERE c.id = messages.conversation_id))
        WHERE quote IS NOT NULL AND json_extract(quote, '$.document') IS NULL
          AND (SELECT document_id FROM conversations c WHERE c.id = messages.conversation_id) IS NOT NULL;
    """,
    # 10: what each span means: its text's embedding by a sentence encoder (infllm_engine.encoder), one row of
    #     float16 per span in Library.spans order, so that a question in the reader's words finds its passage.
    #     Documents read before get theirs on first ask, from their spans' texts.
    """
    CREATE TABLE IF NOT EXISTS meanings (
        document_id INTEGER PRIMARY KEY REFERENCES documents(id) ON DELETE CASCADE,
        encoder TEXT NOT NULL,           -- which encoder made them: another one's are made again
        dim INTEGER NOT NULL,
        vectors BLOB NOT NULL            -- float16 little-endian, [spans, dim], L2-normalised
    );
    """,
]


def migrate(db: Database) -> int:
    """Bring the database to the newest schema; returns its version. Each step is one transaction.

    Foreign keys are off while the steps run (it cannot change inside a transaction): a table rebuilt as
    SQLite's ALTER TABLE recipe says would otherwise take its dependants' rows with it when dropped.
    """
    db.execute("PRAGMA foreign_keys = OFF")
    try:
        return _migrate(db)
    finally:
        db.execute("PRAGMA foreign_keys = ON")


def _migrate(db: Database) -> int:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise LibraryError(f"the library was written by a newer version of this app (schema {version}, this one "
                           f"knows {len(MIGRATIONS)}); update the app, or choose another --data-dir")
    for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
        try:
            with db.conn:
                db.conn.executescript(f"BEGIN; {sql}; PRAGMA user_version = {number}; COMMIT;")
        except sqlite3.OperationalError as err:       # the step rolled back: the schema is as it was
            if "fts5" in str(err):
                raise LibraryError("this Python's SQLite has no FTS5 full-text search, which the library needs "
                                   "(Python from python.org, Debian or Ubuntu has it)") from err
            raise
        if broken := db.execute("PRAGMA foreign_key_check").fetchall():
            raise LibraryError(f"the library's step {number} left {len(broken)} rows without their parent")
    return len(MIGRATIONS)
