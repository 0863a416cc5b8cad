//! Opening a PostgreSQL database: migrations, the read pool, the writer's connection.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection as _, PgConnection};
use tokio_util::sync::CancellationToken;

use super::writer::{Fence, Target};
use super::{Db, Reader, StoreError, Writer};
use crate::config::DatabaseLocation;
use crate::domain::Durability;

/// The PostgreSQL migrations (`migrations/postgres/`), embedded.
pub static PG_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

/// How long a connection may take to open, or a pool to hand one out.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Applies pending migrations to the database at `url` (the migrator holds an advisory
/// lock meanwhile, so nodes starting together migrate once). Refuses a database migrated
/// by a newer version. Returns how many were applied.
pub async fn migrate_postgres(url: &str) -> Result<usize, StoreError> {
    let named = DatabaseLocation::Postgres(url.to_string()).display();
    let options = pg_options(url)?;
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
        .await
        .map_err(|_| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            ))
        })
        .and_then(|connected| connected)
        .map_err(|e| StoreError::PgConnect(named.clone(), e))?;
    let known = PG_MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0);
    let applied_before: Vec<i64> = applied_versions(&mut conn).await?;
    if let Some(&found) = applied_before.iter().max().filter(|&&v| v > known) {
        return Err(StoreError::NewerSchema {
            path: named,
            found,
            known,
        });
    }
    PG_MIGRATIONS.run(&mut conn).await?;
    let applied = applied_versions(&mut conn).await?.len() - applied_before.len();
    conn.close().await?;
    Ok(applied)
}

/// Versions in sqlx's history table; none if it does not exist yet.
async fn applied_versions(conn: &mut PgConnection) -> Result<Vec<i64>, StoreError> {
    let exists: bool = sqlx::query_scalar!(
        r#"/* pg */ SELECT to_regclass('_sqlx_migrations') IS NOT NULL AS "exists!""#
    )
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Ok(Vec::new());
    }
    // The table is created by the migrator, not by a migration: not checked at compile time.
    Ok(
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&mut *conn)
            .await?,
    )
}

/// How every connection of the service is opened: named in `pg_stat_activity`, its
/// statements logged at trace level, the server's notices below warnings not sent.
pub fn pg_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(url
        .parse::<PgConnectOptions>()?
        .application_name("ti-scheduler")
        .options([("client_min_messages", "warning")])
        .log_statements(log::LevelFilter::Trace))
}

/// Creates an empty database `{prefix}_{random}` on the server at `server` (a URL of
/// any of its databases) and returns the URL of the new one: the tests and benchmarks
/// give each run a database of its own this way.
pub async fn create_postgres_database(server: &str, prefix: &str) -> Result<String, StoreError> {
    let named = DatabaseLocation::Postgres(server.to_string()).display();
    let mut url = reqwest::Url::parse(server)
        .map_err(|e| StoreError::PgConnect(named.clone(), sqlx::Error::Configuration(e.into())))?;
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect_with(&pg_options(server)?)
        .await
        .map_err(|e| StoreError::PgConnect(named, e))?;
    // The name is made of the caller's constant prefix and hex digits only.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    url.set_path(&format!("/{name}"));
    Ok(url.to_string())
}

/// Opens the read pool on the database at `url` and starts the writer, whose batches
/// check `fence` when given (high availability). The database must be migrated first
/// ([`migrate_postgres`]: every node does so when it connects to the lease, before it
/// can lead).
pub async fn open_postgres(
    url: &str,
    durability: Durability,
    read_connections: u32,
    max_batch: usize,
    fence: Option<Fence>,
    stop: CancellationToken,
) -> Result<(Db, tokio::task::JoinHandle<()>), StoreError> {
    let read = PgPoolOptions::new()
        .max_connections(read_connections.max(1))
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(pg_options(url)?)
        .await?;
    let target = Target::Postgres {
        url: url.to_string(),
        synchronous_commit: durability == Durability::Full,
        fence,
    };
    let (writer, handle) = Writer::spawn(target, max_batch, stop).await?;
    Ok((
        Db {
            read: Reader::Postgres(read),
            writer,
        },
        handle,
    ))
}
