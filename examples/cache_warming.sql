-- Cache warming for `tiercache warm --dsn ... --file examples/cache_warming.sql` (PostgreSQL).
--
-- Each query is preceded by one `-- tiercache:` annotation and ends with `;` at the end of a line:
--   key=<template>        the cache key, {column} being a column of the result (required)
--   tags=<t1>,<t2>        tag templates (comma-separated, no spaces), for TIERCACHE.INVALIDATE
--   ttl=<seconds>         fresh period (default: --ttl); stale=<seconds> stale window (default 0)
--   name=<name>           the query's name in logs and in the resume state
-- Each row is stored as a MessagePack map of its columns, readable by the Rust and Python clients
-- (TierCache::get::<User>("user:42") with a struct of the same fields). The tags are the ones the
-- pg bridge's mapping invalidates (see README, "Put it in front of PostgreSQL"), so a warmed entry is
-- invalidated by the next committed change of its row. Tables: cli/tests/fixtures/warm_pg.sql.

-- Hot users: the 1000 users with the most requests in the access log over the last 24 hours.
-- tiercache: name=hot_users key=user:{id} tags=user:{id},org:{org_id} ttl=3600 stale=300
SELECT u.id, u.org_id, u.name, u.email
  FROM users u
  JOIN (SELECT user_id, count(*) AS hits
          FROM access_logs
         WHERE accessed_at > now() - interval '24 hours'
         GROUP BY user_id
         ORDER BY hits DESC
         LIMIT 1000) hot ON hot.user_id = u.id;

-- Top products: the 500 most viewed products of the last 7 days, with their view count.
-- tiercache: name=top_products key=product:{id} tags=product:{id},category:{category_id} ttl=1800
SELECT p.id, p.category_id, p.name, p.description, p.price_cents, v.views
  FROM products p
  JOIN (SELECT product_id, count(*) AS views
          FROM product_views
         WHERE viewed_at > now() - interval '7 days'
         GROUP BY product_id
         ORDER BY views DESC
         LIMIT 500) v ON v.product_id = p.id;
