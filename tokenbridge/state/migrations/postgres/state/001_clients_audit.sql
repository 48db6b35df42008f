-- Clients (API clients and enrolled workstations), as in the SQLite store.
CREATE TABLE IF NOT EXISTS clients (
    client_id        TEXT PRIMARY KEY,
    name             TEXT NOT NULL UNIQUE,
    secret_hash      BYTEA NOT NULL,
    grants           TEXT NOT NULL,
    keys             TEXT NOT NULL,
    created          TEXT NOT NULL,
    revoked          TEXT,
    last_seen        TEXT,
    kind             TEXT NOT NULL DEFAULT 'client',
    cert_sha256      TEXT,
    prev_cert_sha256 TEXT,
    cert_not_after   TEXT
)
;;
-- The audit log: one hash chain per hub, each numbered from 1 (state/audit.py).
CREATE TABLE IF NOT EXISTS audit (
    hub          TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    ts           TEXT NOT NULL,
    actor        TEXT NOT NULL,
    event        TEXT NOT NULL,
    key          TEXT,
    algorithm    TEXT,
    input_sha256 TEXT,
    outcome      TEXT NOT NULL,
    detail       TEXT,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL,
    PRIMARY KEY (hub, seq)
)
;;
CREATE INDEX IF NOT EXISTS audit_ts ON audit (hub, ts)
;;
-- Bumped whenever who may do what changes (not on last_seen): each hub caches authentications until it moves.
CREATE TABLE IF NOT EXISTS revisions (name TEXT PRIMARY KEY, value BIGINT NOT NULL)
;;
INSERT INTO revisions VALUES ('clients', 0) ON CONFLICT (name) DO NOTHING
;;
CREATE OR REPLACE FUNCTION tokenbridge_clients_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE revisions SET value = value + 1 WHERE name = 'clients';
    RETURN NULL;
END
$$
;;
DROP TRIGGER IF EXISTS clients_added ON clients
;;
CREATE TRIGGER clients_added AFTER INSERT OR DELETE ON clients
    FOR EACH STATEMENT EXECUTE FUNCTION tokenbridge_clients_changed()
;;
DROP TRIGGER IF EXISTS clients_changed ON clients
;;
CREATE TRIGGER clients_changed AFTER UPDATE OF client_id, name, secret_hash, grants, keys, revoked, kind,
    cert_sha256, prev_cert_sha256 ON clients FOR EACH STATEMENT EXECUTE FUNCTION tokenbridge_clients_changed()
