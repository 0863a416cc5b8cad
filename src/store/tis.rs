//! The `task_instances` table: every TI ever registered, removed ones included.

use super::{Reader, StoreError, Tx};
use crate::domain::{TiKind, TiUuid};

pub(super) const UPSERT_REGISTERED: &str =
    "INSERT INTO task_instances (ti_uuid, host, port, model_name, hardware,
                                 callback_token, registered_at, removed_at, kind,
                                 max_concurrency)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9)
     ON CONFLICT (host, port) DO UPDATE SET
         model_name = excluded.model_name,
         hardware = excluded.hardware,
         kind = excluded.kind,
         max_concurrency = excluded.max_concurrency,
         registered_at = CASE WHEN removed_at IS NULL THEN registered_at
                              ELSE excluded.registered_at END,
         removed_at = NULL
     RETURNING ti_uuid, host, port, model_name, hardware, callback_token,
               registered_at, removed_at, kind, max_concurrency";
pub(super) const MARK_REMOVED: &str =
    "UPDATE task_instances SET removed_at = ?1 WHERE ti_uuid = ?2 AND removed_at IS NULL";

/// Repository of Task Instances.
pub struct TiRepo;

/// A TI as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTi {
    /// Its id.
    pub ti_uuid: TiUuid,
    /// Host it serves on.
    pub host: String,
    /// Port it serves on.
    pub port: u16,
    /// The model it serves.
    pub model_name: String,
    /// Its hardware, when it reported one.
    pub hardware: Option<String>,
    /// Secret it must echo in result callbacks.
    pub callback_token: String,
    /// Unix seconds.
    pub registered_at: f64,
    /// Unix seconds; `None` while registered.
    pub removed_at: Option<f64>,
    /// How the scheduler talks to it.
    pub kind: TiKind,
    /// Requests in flight to it at once, when registration said.
    pub max_concurrency: Option<u32>,
}

struct TiRow {
    ti_uuid: String,
    host: String,
    port: i64,
    model_name: String,
    hardware: Option<String>,
    callback_token: String,
    registered_at: f64,
    removed_at: Option<f64>,
    kind: String,
    max_concurrency: Option<i64>,
}

impl TryFrom<TiRow> for StoredTi {
    type Error = StoreError;

    fn try_from(row: TiRow) -> Result<Self, StoreError> {
        Ok(Self {
            ti_uuid: row
                .ti_uuid
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("bad ti_uuid {:?}", row.ti_uuid)))?,
            port: u16::try_from(row.port)
                .map_err(|_| StoreError::Corrupt(format!("bad port {}", row.port)))?,
            host: row.host,
            model_name: row.model_name,
            hardware: row.hardware,
            callback_token: row.callback_token,
            registered_at: row.registered_at,
            removed_at: row.removed_at,
            kind: TiKind::parse(&row.kind).map_err(StoreError::Corrupt)?,
            max_concurrency: row
                .max_concurrency
                .map(|c| {
                    u32::try_from(c)
                        .map_err(|_| StoreError::Corrupt(format!("bad max_concurrency {c}")))
                })
                .transpose()?,
        })
    }
}

impl TiRepo {
    /// Every TI, in registration order.
    pub async fn all(read: &Reader) -> Result<Vec<StoredTi>, StoreError> {
        let rows = match read {
            Reader::Sqlite(pool) => {
                sqlx::query_as!(
                    TiRow,
                    "SELECT ti_uuid, host, port, model_name, hardware, callback_token,
                            registered_at, removed_at, kind, max_concurrency
                     FROM task_instances ORDER BY registered_at, ti_uuid"
                )
                .fetch_all(pool)
                .await?
            }
            Reader::Postgres(pool) => {
                sqlx::query_as!(
                    TiRow,
                    "/* pg */ SELECT ti_uuid, host, port, model_name, hardware, callback_token,
                            registered_at, removed_at, kind, max_concurrency
                     FROM task_instances ORDER BY registered_at, ti_uuid"
                )
                .fetch_all(pool)
                .await?
            }
        };
        rows.into_iter().map(StoredTi::try_from).collect()
    }

    /// Registers a TI, or revives the row of the same host:port (keeping its ti_uuid and
    /// token, taking the new model and hardware). Returns the stored row.
    pub fn upsert_registered(tx: &mut Tx<'_>, ti: &StoredTi) -> Result<StoredTi, StoreError> {
        let conn = match tx {
            Tx::Sqlite(conn) => conn,
            Tx::Postgres(pg) => {
                let row = pg.rt.block_on(
                    sqlx::query_as!(
                        TiRow,
                        "/* pg */ INSERT INTO task_instances (ti_uuid, host, port, model_name, hardware,
                                                     callback_token, registered_at, removed_at, kind,
                                                     max_concurrency)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8, $9)
                         ON CONFLICT (host, port) DO UPDATE SET
                             model_name = excluded.model_name,
                             hardware = excluded.hardware,
                             kind = excluded.kind,
                             max_concurrency = excluded.max_concurrency,
                             registered_at = CASE WHEN task_instances.removed_at IS NULL
                                                  THEN task_instances.registered_at
                                                  ELSE excluded.registered_at END,
                             removed_at = NULL
                         RETURNING ti_uuid, host, port, model_name, hardware, callback_token,
                                   registered_at, removed_at, kind, max_concurrency",
                        ti.ti_uuid.to_string(),
                        ti.host,
                        i64::from(ti.port),
                        ti.model_name,
                        ti.hardware,
                        ti.callback_token,
                        ti.registered_at,
                        ti.kind.as_str(),
                        ti.max_concurrency.map(i64::from)
                    )
                    .fetch_one(&mut *pg.conn),
                )?;
                return row.try_into();
            }
        };
        let row = conn.prepare_cached(UPSERT_REGISTERED)?.query_row(
            (
                ti.ti_uuid.to_string(),
                &ti.host,
                i64::from(ti.port),
                &ti.model_name,
                &ti.hardware,
                &ti.callback_token,
                ti.registered_at,
                ti.kind.as_str(),
                ti.max_concurrency,
            ),
            |r| {
                Ok(TiRow {
                    ti_uuid: r.get(0)?,
                    host: r.get(1)?,
                    port: r.get(2)?,
                    model_name: r.get(3)?,
                    hardware: r.get(4)?,
                    callback_token: r.get(5)?,
                    registered_at: r.get(6)?,
                    removed_at: r.get(7)?,
                    kind: r.get(8)?,
                    max_concurrency: r.get(9)?,
                })
            },
        )?;
        row.try_into()
    }

    /// Marks a registered TI removed. Returns false if it is unknown or already removed.
    pub fn mark_removed(tx: &mut Tx<'_>, ti: TiUuid, at: f64) -> Result<bool, StoreError> {
        let changed = match tx {
            Tx::Sqlite(conn) => conn
                .prepare_cached(MARK_REMOVED)?
                .execute((at, ti.to_string()))? as u64,
            Tx::Postgres(pg) => pg
                .rt
                .block_on(
                    sqlx::query!(
                        "/* pg */ UPDATE task_instances SET removed_at = $1
                         WHERE ti_uuid = $2 AND removed_at IS NULL",
                        at,
                        ti.to_string()
                    )
                    .execute(&mut *pg.conn),
                )?
                .rows_affected(),
        };
        Ok(changed == 1)
    }
}
