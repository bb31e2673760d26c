//! `tiercache pg install` / `pg uninstall`: the outbox table and one PL/pgSQL trigger per mapped table.
//!
//! Everything is created in one transaction with `CREATE ... IF NOT EXISTS` / `CREATE OR REPLACE`, so
//! running `install` again applies an edited mapping: changed templates replace the trigger functions,
//! and tables no longer in the mapping lose their trigger.

use tokio_postgres::Client;

use super::pg_err;

use super::mapping::{function_name, ident, literal, parse_template, split_table, template_sql, Mapping, Part, TRIGGER_NAME};

/// The statements that create the outbox (run first, in the install transaction).
pub fn outbox_sql(m: &Mapping) -> String {
    let s = ident(&m.schema);
    // `xid` is the writing transaction (xid8: no wraparound); `at` the row's write time, used for the
    // lag metric when track_commit_timestamp is off.
    format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.outbox (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
             at timestamptz NOT NULL DEFAULT clock_timestamp(),
             tags text[] NOT NULL
         );"
    )
}

/// The trigger function and trigger of one mapped table.
pub fn trigger_sql(m: &Mapping, table: &str, templates: &[Vec<Part>]) -> Result<String, String> {
    let (tschema, tname) = split_table(table)?;
    let f = format!("{}.{}", ident(&m.schema), ident(&function_name(&tschema, &tname)));
    let row_tags = |row: &str| templates.iter().map(|p| template_sql(&m.tag_prefix, p, row)).collect::<Vec<_>>().join(", ");
    let body = format!(
        "DECLARE t text[] := '{{}}';
BEGIN
  IF TG_OP = 'UPDATE' AND OLD IS NOT DISTINCT FROM NEW THEN
    RETURN NULL;
  END IF;
  IF TG_OP <> 'INSERT' THEN
    t := t || ARRAY[{old}];
  END IF;
  IF TG_OP <> 'DELETE' THEN
    t := t || ARRAY[{new}];
  END IF;
  t := ARRAY(SELECT DISTINCT x FROM unnest(t) AS x WHERE x IS NOT NULL AND x <> '');
  IF cardinality(t) > 0 THEN
    INSERT INTO {schema}.outbox (tags) VALUES (t);
    PERFORM pg_notify({channel}, '');
  END IF;
  RETURN NULL;
END",
        old = row_tags("OLD"),
        new = row_tags("NEW"),
        schema = ident(&m.schema),
        channel = literal(&m.channel),
    );
    if body.contains("$tiercache$") {
        return Err(format!("table {table}: a template contains $tiercache$"));
    }
    Ok(format!(
        "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $tiercache$
{body}
$tiercache$;
CREATE OR REPLACE TRIGGER {trg} AFTER INSERT OR UPDATE OR DELETE ON {ts}.{tn}
  FOR EACH ROW EXECUTE FUNCTION {f}();",
        trg = ident(TRIGGER_NAME),
        ts = ident(&tschema),
        tn = ident(&tname),
    ))
}

/// The tables that carry our trigger now: (schema, table).
async fn installed_triggers(tx: &tokio_postgres::Transaction<'_>, schema: &str) -> Result<Vec<(String, String)>, String> {
    let rows = tx
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_trigger tg
               JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_proc p ON p.oid = tg.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
              WHERE tg.tgname = $1 AND pn.nspname = $2",
            &[&TRIGGER_NAME, &schema],
        )
        .await
        .map_err(|e| format!("listing triggers: {}", pg_err(&e)))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Our trigger functions in the schema.
async fn installed_functions(tx: &tokio_postgres::Transaction<'_>, schema: &str) -> Result<Vec<String>, String> {
    let rows = tx
        .query(
            "SELECT p.proname::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1 AND p.proname LIKE 'invalidate\\_\\_%'",
            &[&schema],
        )
        .await
        .map_err(|e| format!("listing functions: {}", pg_err(&e)))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What `install` did, for the log line.
#[derive(Debug, Default)]
pub struct Report {
    pub installed: Vec<String>,
    pub removed: Vec<String>,
}

pub async fn install(client: &mut Client, m: &Mapping) -> Result<Report, String> {
    let tx = client.transaction().await.map_err(|e| pg_err(&e))?;
    // Two installs at once would interleave their DDL: serialise them.
    tx.batch_execute("SELECT pg_advisory_xact_lock(hashtext('tiercache pg install'))").await.map_err(|e| pg_err(&e))?;
    tx.batch_execute(&outbox_sql(m)).await.map_err(|e| format!("creating the outbox: {}", pg_err(&e)))?;
    let mut report = Report::default();
    let mut keep_fns = Vec::new();
    for (table, t) in &m.tables {
        let (ts, tn) = split_table(table)?;
        let templates = t.tags.iter().map(|s| parse_template(s)).collect::<Result<Vec<_>, _>>()?;
        // Every placeholder must be a column: a typo would otherwise fail at the first write.
        let cols: Vec<String> = tx
            .query(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
                &[&ts, &tn],
            )
            .await
            .map_err(|e| pg_err(&e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if cols.is_empty() {
            return Err(format!("table {ts}.{tn} does not exist (or has no columns)"));
        }
        for p in templates.iter().flatten() {
            if let Part::Col(c) = p {
                if !cols.contains(c) {
                    return Err(format!("table {ts}.{tn} has no column {c:?} (columns: {})", cols.join(", ")));
                }
            }
        }
        tx.batch_execute(&trigger_sql(m, table, &templates)?).await.map_err(|e| format!("table {ts}.{tn}: {}", pg_err(&e)))?;
        keep_fns.push(function_name(&ts, &tn));
        report.installed.push(format!("{ts}.{tn}"));
    }
    for (ts, tn) in installed_triggers(&tx, &m.schema).await? {
        if !report.installed.contains(&format!("{ts}.{tn}")) {
            tx.batch_execute(&format!("DROP TRIGGER {} ON {}.{}", ident(TRIGGER_NAME), ident(&ts), ident(&tn)))
                .await
                .map_err(|e| pg_err(&e))?;
            report.removed.push(format!("{ts}.{tn}"));
        }
    }
    for f in installed_functions(&tx, &m.schema).await? {
        if !keep_fns.contains(&f) {
            tx.batch_execute(&format!("DROP FUNCTION {}.{}()", ident(&m.schema), ident(&f))).await.map_err(|e| pg_err(&e))?;
        }
    }
    tx.commit().await.map_err(|e| pg_err(&e))?;
    Ok(report)
}

/// Removes every trigger and function of the schema, and the outbox: refused while the outbox still
/// holds rows (invalidations not delivered yet) unless `force`.
pub async fn uninstall(client: &mut Client, m: &Mapping, force: bool) -> Result<Report, String> {
    let tx = client.transaction().await.map_err(|e| pg_err(&e))?;
    tx.batch_execute("SELECT pg_advisory_xact_lock(hashtext('tiercache pg install'))").await.map_err(|e| pg_err(&e))?;
    let s = ident(&m.schema);
    let mut report = Report::default();
    for (ts, tn) in installed_triggers(&tx, &m.schema).await? {
        tx.batch_execute(&format!("DROP TRIGGER {} ON {}.{}", ident(TRIGGER_NAME), ident(&ts), ident(&tn)))
            .await
            .map_err(|e| pg_err(&e))?;
        report.removed.push(format!("{ts}.{tn}"));
    }
    for f in installed_functions(&tx, &m.schema).await? {
        tx.batch_execute(&format!("DROP FUNCTION {s}.{}()", ident(&f))).await.map_err(|e| pg_err(&e))?;
    }
    let exists: bool =
        tx.query_one("SELECT to_regclass($1) IS NOT NULL", &[&format!("{s}.outbox")]).await.map_err(|e| pg_err(&e))?.get(0);
    if exists {
        let pending: i64 = tx.query_one(&format!("SELECT count(*) FROM {s}.outbox"), &[]).await.map_err(|e| pg_err(&e))?.get(0);
        if pending > 0 && !force {
            return Err(format!(
                "the outbox still holds {pending} undelivered row(s): run the bridge until it is empty, or pass --force"
            ));
        }
        tx.batch_execute(&format!("DROP TABLE {s}.outbox")).await.map_err(|e| pg_err(&e))?;
    }
    // The schema goes only when nothing else lives in it (it may be shared with the application).
    let empty: bool = tx
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1)
                AND NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1)
                AND EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&m.schema],
        )
        .await
        .map_err(|e| pg_err(&e))?
        .get(0);
    if empty && m.schema != "public" {
        tx.batch_execute(&format!("DROP SCHEMA {s}")).await.map_err(|e| pg_err(&e))?;
    }
    tx.commit().await.map_err(|e| pg_err(&e))?;
    Ok(report)
}
