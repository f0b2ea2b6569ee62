-- A new revision of one deployment, inside the transaction that writes its goal.
-- KEYS: revisions, revision counter; ARGV: deployment.
--! include bump.lua
bump(KEYS[1], KEYS[2], ARGV[1])
