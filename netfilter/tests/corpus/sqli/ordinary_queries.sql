SELECT abalance FROM pgbench_accounts WHERE aid = 48213
UPDATE pgbench_accounts SET abalance = abalance + -2347 WHERE aid = 48213
UPDATE pgbench_tellers SET tbalance = tbalance + -2347 WHERE tid = 7
UPDATE pgbench_branches SET bbalance = bbalance + -2347 WHERE bid = 1
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 48213, -2347, CURRENT_TIMESTAMP)
BEGIN
COMMIT
ROLLBACK
SET application_name = 'checkout'
SET TIME ZONE 'UTC'
SHOW server_version
SELECT version()
SELECT current_database(), current_user
SELECT 1
SELECT now()
SELECT id, email, created_at FROM users WHERE id = 42
SELECT id, email FROM users WHERE email = 'ana@example.com' LIMIT 1
SELECT "users"."id", "users"."email" FROM "users" WHERE "users"."id" = $1 LIMIT $2
SELECT "orders".* FROM "orders" WHERE "orders"."customer_id" = $1 ORDER BY "orders"."created_at" DESC LIMIT 20
SELECT COUNT(*) FROM "orders" WHERE "orders"."status" IN ('paid', 'shipped')
SELECT o.id, o.total, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.created_at > now() - interval '7 days'
SELECT product_id, SUM(quantity) AS sold FROM order_lines GROUP BY product_id HAVING SUM(quantity) > 100 ORDER BY sold DESC
INSERT INTO payments (order_id, amount_cents, currency, token) VALUES (1042, 1999, 'EUR', 'tok_8f3a9c') RETURNING id
UPDATE payments SET status = 'captured', captured_at = now() WHERE id = 881 AND status = 'authorized'
DELETE FROM sessions WHERE expires_at < now()
DELETE FROM cart_items WHERE cart_id = 55 AND product_id = 9
SELECT * FROM products WHERE name ILIKE '%shoe%' AND price BETWEEN 10 AND 100
SELECT * FROM products WHERE category_id = 3 OR featured = true
SELECT * FROM orders WHERE status = 'paid' OR status = 'refunded'
SELECT * FROM accounts WHERE (owner_id = 5 OR shared = true) AND deleted_at IS NULL
SELECT * FROM events WHERE payload->>'type' = 'login' AND (payload->>'ok')::boolean
SELECT id FROM t1 UNION SELECT id FROM t2
SELECT name FROM staff UNION ALL SELECT name FROM contractors ORDER BY name
SELECT 'a' || 'b' AS joined
SELECT coalesce(nickname, first_name) FROM people WHERE id = 3
WITH recent AS (SELECT * FROM orders WHERE created_at > now() - interval '1 day') SELECT count(*) FROM recent
SELECT pg_advisory_lock(42)
SELECT pg_try_advisory_lock(hashtext('job-runner'))
SELECT relname FROM pg_catalog.pg_class WHERE relkind = 'r'
SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'
SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'orders'
CREATE TABLE IF NOT EXISTS audit_events (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), body jsonb)
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_customer_idx ON orders (customer_id)
ALTER TABLE orders ADD COLUMN notes text
DROP TABLE IF EXISTS tmp_import
TRUNCATE TABLE staging_rows
COPY staging_rows FROM STDIN WITH (FORMAT csv)
VACUUM ANALYZE orders
LISTEN order_events
NOTIFY order_events, 'order 42 paid'
PREPARE q1 AS SELECT * FROM users WHERE id = $1
EXECUTE q1(42)
DEALLOCATE q1
SELECT * FROM users WHERE name = 'O''Brien'
SELECT * FROM notes WHERE body LIKE '%--%'
SELECT * FROM notes WHERE body = 'it''s -- not a comment'
SELECT 'x' -- trailing comment
SELECT a, b FROM t WHERE a = 1 /* why: ticket 8812 */
UPDATE a SET x = 1 WHERE id = 1; UPDATE a SET x = 2 WHERE id = 2;
INSERT INTO kv (k, v) VALUES ('a', '1') ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v
SELECT * FROM users WHERE id = ANY($1::int[])
SELECT json_build_object('id', id, 'email', email) FROM users WHERE id = 1
SELECT date_trunc('day', created_at) AS d, count(*) FROM orders GROUP BY 1 ORDER BY 1
SELECT * FROM t WHERE 1=1 AND a = 2
SELECT * FROM t WHERE true AND a = 2
SELECT CASE WHEN amount > 100 THEN 'big' ELSE 'small' END FROM payments
SELECT id FROM jobs WHERE run_at <= now() AND locked_by IS NULL ORDER BY run_at LIMIT 10 FOR UPDATE SKIP LOCKED
UPDATE jobs SET locked_by = 'worker-3', locked_at = now() WHERE id = 77
SELECT `id`, `name` FROM `customers` WHERE `id` = 12
SELECT SQL_NO_CACHE * FROM orders WHERE id = 4
SELECT @@version_comment LIMIT 1
SELECT DATABASE()
SHOW TABLES
SHOW VARIABLES LIKE 'max_connections'
SET NAMES utf8mb4
SET autocommit=1
SELECT * FROM items WHERE sku = 'AB-12-CD' AND warehouse = 3
INSERT INTO `logs` (`level`, `msg`) VALUES ('info', 'user logged in')
UPDATE `carts` SET `updated_at` = NOW() WHERE `id` = 991
SELECT * FROM messages WHERE thread_id = 7 AND (sender = 1 OR recipient = 1)
SELECT * FROM wallet WHERE user_id = 5 AND balance >= 0
SELECT MAX(id) FROM orders
SELECT count(*) FILTER (WHERE status = 'failed') FROM payments
SELECT * FROM pg_stat_activity WHERE state = 'active'
SELECT set_config('search_path', 'app,public', false)
SELECT * FROM users WHERE created_at > '2026-01-01' OR updated_at > '2026-01-01'
SELECT * FROM a LEFT JOIN b USING (id) WHERE b.id IS NULL
SELECT * FROM t WHERE a <> 'x' OR b != 'y'
SELECT * FROM t WHERE flag OR other_flag
