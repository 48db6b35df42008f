-- The hubs sharing this database (issue 18): each writes its row at every heartbeat (services/hubs.py).
CREATE TABLE IF NOT EXISTS hubs (
    name       TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    heartbeat  DOUBLE PRECISION NOT NULL,
    started    DOUBLE PRECISION NOT NULL,
    keys       TEXT NOT NULL DEFAULT '[]'
)
