//! Typed settings.
//!
//! Layers, weakest first: the built-in defaults below, `config/default.toml` (or the file
//! given with `--config`), environment variables `TI_SCHEDULER__SECTION__KEY`, then
//! command-line flags. `config/default.toml` documents every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::domain::{Durability, PredictMode, StrategyKind};

/// Every setting of the service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// HTTP server.
    pub server: ServerSettings,
    /// The database: SQLite (default) or PostgreSQL.
    pub database: DatabaseSettings,
    /// High availability on PostgreSQL: several nodes, one leader.
    pub ha: HaSettings,
    /// Talking to Task Instances.
    pub ti: TiSettings,
    /// Strategy and predictor defaults.
    pub scheduling: SchedulingSettings,
    /// Periodic cleanup of old results and history.
    pub cleanup: CleanupSettings,
}

/// HTTP server settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the API listens on.
    pub bind: SocketAddr,
    /// Events kept for `GET /events` clients that reconnect (`Last-Event-ID`) or read
    /// slowly.
    pub event_buffer: usize,
    /// Base URL TIs use to reach this scheduler's `/result/submit`; derived from `bind`
    /// when empty (a wildcard bind address becomes 127.0.0.1).
    pub public_url: String,
    /// Largest accepted request body, in bytes.
    pub body_limit_bytes: usize,
    /// When non-empty, `/scheduler/*`, `/ti/*` writes, lookup import and `/admin/drain`
    /// require `Authorization: Bearer <token>`.
    pub admin_token: String,
    /// Deepest nesting of arrays and objects accepted in a task's `task_input` and
    /// `metadata` (`{}` is 1); deeper is 400. Below what TIs' JSON parsers take.
    pub max_json_depth: usize,
    /// Most tasks in one `POST /queue/submit_batch`; more is 400.
    pub max_batch_tasks: usize,
    /// Time a client has to send a request's head (and, on a keep-alive connection, the
    /// next request's), ms; then the connection is closed.
    pub header_read_timeout_ms: u64,
    /// A connection that moves no byte this long is closed once its request is
    /// answered (dropped after a second such period), ms.
    pub idle_timeout_ms: u64,
    /// Connections served at once; beyond, a new one is closed at once. Lowered at start
    /// to three quarters of the open-file limit if that is smaller.
    pub max_connections: usize,
    /// When non-empty, the OpenAI front door (`/v1/*`) requires
    /// `Authorization: Bearer <key>` with one of these keys. Separate from `admin_token`.
    pub api_keys: Vec<String>,
    /// On SIGTERM or Ctrl-C the service drains (refuses new tasks, `/ready` answers 503)
    /// and waits up to this long for the unfinished tasks to finish before it stops, ms.
    pub shutdown_grace_ms: u64,
}

/// Database settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite:PATH` or `postgres://user@host:port/db`; empty: SQLite at `path`.
    pub url: String,
    /// The SQLite file when `url` is empty; created and migrated on first start.
    pub path: PathBuf,
    /// `full` (a commit survives power loss) or `normal` (it survives a process crash).
    pub durability: Durability,
    /// Largest number of writes committed in one transaction by the group-commit writer.
    pub max_batch: usize,
    /// Connections in the read pool (SQLite: read-only connections; PostgreSQL: the
    /// pool beside the writer's own connection).
    pub read_connections: u32,
    /// Largest size of the database file, MiB (`PRAGMA max_page_count`); 0 = no limit.
    /// Beyond it writes are refused as on a full disk (507) while reads go on.
    pub max_size_mb: u64,
    /// Run `PRAGMA quick_check` on the file at start and refuse a corrupt one.
    pub quick_check: bool,
}

/// High availability (PostgreSQL only; docs/API.md, "Standby nodes").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HaSettings {
    /// Run as one of several nodes sharing one PostgreSQL database; only the node holding
    /// the leader lease serves, the others answer 503 naming the leader.
    pub enabled: bool,
    /// How long a lease lasts without renewal, ms; the leader renews it every third of
    /// this, and a standby takes over within twice this after the leader dies.
    pub lease_ms: u64,
    /// This node's name in the lease; empty: the host name and the process id.
    pub node_id: String,
}

/// Where the state lives, from `database.url` (or `database.path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://` or `postgresql://` URL).
    Postgres(String),
}

impl DatabaseLocation {
    /// For logs: the file, or the URL without its password.
    pub fn display(&self) -> String {
        match self {
            Self::Sqlite(path) => path.display().to_string(),
            Self::Postgres(url) => redact_password(url),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        _ => url.to_string(),
    }
}

impl DatabaseSettings {
    /// The database `url` names (or the file `path` names when `url` is empty).
    pub fn location(&self) -> Result<DatabaseLocation, String> {
        let url = self.url.trim();
        if url.is_empty() {
            return Ok(DatabaseLocation::Sqlite(self.path.clone()));
        }
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("database.url sqlite: names no file (sqlite:PATH)".into());
            }
            return Ok(DatabaseLocation::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseLocation::Postgres(url.to_string()));
        }
        Err(format!(
            "database.url {:?} is neither sqlite:PATH nor postgres://...",
            redact_password(url)
        ))
    }
}

/// Settings for the scheduler's side of the TI protocol.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TiSettings {
    /// Timeout of `GET /health` and `GET /info` (registration and probes), ms.
    pub health_timeout_ms: u64,
    /// Timeout of one dispatch (`POST /queue/submit` to a TI), ms.
    pub dispatch_timeout_ms: u64,
    /// Dispatch attempts on one TI before the task is re-routed.
    pub dispatch_attempts: u32,
    /// Backoff before the first retry, ms; doubled after each failed attempt.
    pub retry_backoff_ms: u64,
    /// Interval between health probes of every TI, ms.
    pub health_interval_ms: u64,
    /// After this many failed probes in a row, a TI's unfinished tasks are re-routed.
    pub reroute_after_failed_probes: u32,
    /// A scheduled task whose callback has not come after this long is reconciled with its
    /// TI through `GET /results/{task_id}`, ms.
    pub reconcile_after_ms: u64,
    /// Dispatches in flight to one callback TI at most (unless its registration gives
    /// `max_concurrency`).
    pub max_inflight_dispatches: usize,
    /// Timeout of one request to an OpenAI-compatible TI (the whole inference), ms.
    pub request_timeout_ms: u64,
    /// When non-empty, TIs may only be registered at these hosts or networks
    /// (`10.0.0.5`, `localhost`, `192.168.0.0/16`). Names match names (never resolved);
    /// addresses match addresses and networks.
    pub allowed_hosts: Vec<String>,
}

/// Strategy and prediction settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulingSettings {
    /// Strategy used until one is set through `/scheduler/set` (then the stored one wins).
    pub strategy: StrategyKind,
    /// Predict mode used until one is set through `/scheduler/predict_mode`.
    pub predict_mode: PredictMode,
    /// λ of the `weighted` strategy: score = expected completion + λ · its error.
    pub weighted_lambda: f64,
    /// Seed of the `probabilistic` strategy's random draws; 0 seeds from the OS.
    pub rng_seed: u64,
    /// Prediction used when nothing better is known: mean execution time, ms.
    pub prior_ms: f64,
    /// Error (standard deviation) of the prior, ms.
    pub prior_error_ms: f64,
    /// A submitted task whose predicted wait on the TI chosen for it exceeds this is
    /// refused (429 with `Retry-After`), ms; 0 = no limit.
    pub max_wait_ms: u64,
    /// A submit is refused (429) while this many tasks of its model are placed on its TIs
    /// and not finished; 0 = no limit.
    pub max_waiting_tasks: u64,
}

/// Cleanup job settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CleanupSettings {
    /// When the job runs: a cron expression with seconds (`sec min hour day month weekday`).
    pub schedule: String,
    /// Results of completed tasks are cleared this long after completion, seconds.
    pub result_ttl_secs: u64,
    /// Completed task rows (and their decisions) are deleted this long after completion, seconds.
    pub retention_secs: u64,
    /// Rows changed per transaction, so the job never holds the writer for long.
    pub batch_size: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8102)),
            event_buffer: 10_000,
            public_url: String::new(),
            body_limit_bytes: 8 * 1024 * 1024,
            admin_token: String::new(),
            max_json_depth: 64,
            max_batch_tasks: 1_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 1_024,
            api_keys: Vec::new(),
            shutdown_grace_ms: 30_000,
        }
    }
}

impl Default for HaSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            lease_ms: 3_000,
            node_id: String::new(),
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            path: PathBuf::from("data/ti-scheduler.db"),
            durability: Durability::Full,
            max_batch: 512,
            read_connections: 4,
            max_size_mb: 0,
            quick_check: true,
        }
    }
}

impl Default for TiSettings {
    fn default() -> Self {
        Self {
            health_timeout_ms: 2_000,
            dispatch_timeout_ms: 5_000,
            dispatch_attempts: 3,
            retry_backoff_ms: 100,
            health_interval_ms: 5_000,
            reroute_after_failed_probes: 3,
            reconcile_after_ms: 30_000,
            max_inflight_dispatches: 64,
            request_timeout_ms: 600_000,
            allowed_hosts: Vec::new(),
        }
    }
}

impl Default for SchedulingSettings {
    fn default() -> Self {
        Self {
            strategy: StrategyKind::ShortestQueue,
            predict_mode: PredictMode::Default,
            weighted_lambda: 1.0,
            rng_seed: 0,
            prior_ms: 1_000.0,
            prior_error_ms: 500.0,
            max_wait_ms: 0,
            max_waiting_tasks: 0,
        }
    }
}

impl Default for CleanupSettings {
    fn default() -> Self {
        Self {
            schedule: "0 */5 * * * *".to_string(),
            result_ttl_secs: 24 * 3600,
            retention_secs: 7 * 24 * 3600,
            batch_size: 1_000,
        }
    }
}

/// The settings file read when no `--config` is given; optional.
pub const DEFAULT_FILE: &str = "config/default.toml";

/// Prefix of the environment variables that override the file.
const ENV_PREFIX: &str = "TI_SCHEDULER__";

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A settings file given with `--config` does not exist.
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    /// The file or an environment variable holds a bad value or an unknown key.
    #[error("invalid settings: {0}")]
    Invalid(#[from] Box<figment::Error>),
}

/// Settings, and where they came from (for the start-up line).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The settings.
    pub settings: Settings,
    /// `config/default.toml`, `built-in defaults (config/default.toml not found)`, ...,
    /// followed by the number of `TI_SCHEDULER__` variables read, if any.
    pub source: String,
}

impl Settings {
    /// Loads the settings as the commands do: the built-in defaults, then the file `given`
    /// with `--config` (which must exist) or else [`DEFAULT_FILE`] if it exists, then the
    /// environment. The caller applies its command-line flags on top.
    pub fn load_for_command(given: Option<&Path>) -> Result<Loaded, ConfigError> {
        let (file, mut source) = match given {
            Some(file) if !file.is_file() => return Err(ConfigError::Missing(file.into())),
            Some(file) => (file, file.display().to_string()),
            None if Path::new(DEFAULT_FILE).is_file() => {
                (Path::new(DEFAULT_FILE), DEFAULT_FILE.to_string())
            }
            None => (
                Path::new(DEFAULT_FILE),
                format!("built-in defaults ({DEFAULT_FILE} not found)"),
            ),
        };
        let settings = Self::load(file)?;
        let vars = std::env::vars_os()
            .filter(|(k, _)| k.to_string_lossy().starts_with(ENV_PREFIX))
            .count();
        if vars > 0 {
            source.push_str(&format!(" + {vars} {ENV_PREFIX}* variable(s)"));
        }
        Ok(Loaded { settings, source })
    }

    /// Loads the settings: defaults, then `file` if it exists, then the environment.
    /// A missing file is not an error (the defaults serve); a malformed one is.
    pub fn load(file: &Path) -> Result<Self, Box<figment::Error>> {
        Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::file(file))
            .merge(Env::prefixed(ENV_PREFIX).split("__"))
            .extract()
            .map_err(Box::new)
    }

    /// The base URL TIs call back on.
    pub fn public_url(&self, bound: SocketAddr) -> String {
        if !self.server.public_url.is_empty() {
            return self.server.public_url.trim_end_matches('/').to_string();
        }
        let mut addr = bound;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }
}

impl TiSettings {
    /// Timeout of health and info requests.
    pub fn health_timeout(&self) -> Duration {
        Duration::from_millis(self.health_timeout_ms)
    }
}

#[cfg(test)]
// figment's Jail dictates the closures' error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_equals_the_built_in_defaults() {
        // In a jail too: jails hold one lock, so no other test's variables leak in.
        figment::Jail::expect_with(|_jail| {
            let shipped = Settings::load(Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/config/default.toml"
            )))
            .map_err(|e| *e)?;
            assert_eq!(shipped, Settings::default());
            Ok(())
        });
    }

    #[test]
    fn api_keys_come_as_a_list_from_the_file_or_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("keys.toml", "[server]\napi_keys = [\"a\", \"b\"]\n")?;
            let from_file = Settings::load(Path::new("keys.toml")).map_err(|e| *e)?;
            assert_eq!(from_file.server.api_keys, ["a", "b"]);
            jail.set_env("TI_SCHEDULER__SERVER__API_KEYS", "[key-1,key-2]");
            let from_env = Settings::load(Path::new("keys.toml")).map_err(|e| *e)?;
            assert_eq!(from_env.server.api_keys, ["key-1", "key-2"]);
            Ok(())
        });
    }

    #[test]
    fn environment_variables_override_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "settings.toml",
                "[cleanup]\nresult_ttl_secs = 10\n[server]\nadmin_token = \"from-file\"\n",
            )?;
            jail.set_env("TI_SCHEDULER__CLEANUP__RESULT_TTL_SECS", "60");
            jail.set_env("TI_SCHEDULER__SCHEDULING__STRATEGY", "round_robin");
            let s = Settings::load(Path::new("settings.toml")).map_err(|e| *e)?;
            assert_eq!(s.cleanup.result_ttl_secs, 60);
            assert_eq!(s.server.admin_token, "from-file");
            assert_eq!(s.scheduling.strategy, StrategyKind::RoundRobin);
            assert_eq!(s.database.path, PathBuf::from("data/ti-scheduler.db"));
            Ok(())
        });
    }

    #[test]
    fn a_given_file_that_does_not_exist_is_an_error_naming_it_and_the_default_one_is_optional() {
        figment::Jail::expect_with(|jail| {
            let err = Settings::load_for_command(Some(Path::new("nowhere.toml"))).unwrap_err();
            assert_eq!(err.to_string(), "config file nowhere.toml does not exist");
            // The jail is an empty directory: no config/default.toml in it.
            let loaded = Settings::load_for_command(None).map_err(|e| e.to_string())?;
            assert_eq!(loaded.settings, Settings::default());
            assert!(
                loaded.source.contains("built-in defaults"),
                "{}",
                loaded.source
            );
            jail.create_file("s.toml", "[database]\npath = \"from-file.db\"\n")?;
            jail.set_env("TI_SCHEDULER__CLEANUP__BATCH_SIZE", "7");
            let loaded =
                Settings::load_for_command(Some(Path::new("s.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(loaded.settings.database.path, PathBuf::from("from-file.db"));
            assert_eq!(loaded.settings.cleanup.batch_size, 7);
            assert_eq!(loaded.source, "s.toml + 1 TI_SCHEDULER__* variable(s)");
            Ok(())
        });
    }

    #[test]
    fn the_database_url_names_a_file_or_a_postgres_server_and_anything_else_is_refused() {
        let mut db = DatabaseSettings::default();
        assert_eq!(
            db.location().unwrap(),
            DatabaseLocation::Sqlite(PathBuf::from("data/ti-scheduler.db"))
        );
        db.url = "sqlite:state/x.db".into();
        assert_eq!(
            db.location().unwrap(),
            DatabaseLocation::Sqlite(PathBuf::from("state/x.db"))
        );
        db.url = "sqlite:///abs/x.db".into();
        assert_eq!(
            db.location().unwrap(),
            DatabaseLocation::Sqlite(PathBuf::from("/abs/x.db"))
        );
        db.url = "postgres://u:pw@127.0.0.1:5432/sched".into();
        let pg = db.location().unwrap();
        assert_eq!(
            pg,
            DatabaseLocation::Postgres("postgres://u:pw@127.0.0.1:5432/sched".into())
        );
        assert_eq!(pg.display(), "postgres://u:***@127.0.0.1:5432/sched");
        db.url = "mysql://u:pw@h/db".into();
        assert_eq!(
            db.location().unwrap_err(),
            "database.url \"mysql://u:***@h/db\" is neither sqlite:PATH nor postgres://..."
        );
        db.url = "sqlite:".into();
        assert!(db.location().unwrap_err().contains("names no file"));
    }

    #[test]
    fn a_misspelled_key_is_an_error_naming_it() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("settings.toml", "[server]\nbnid = \"x\"\n")?;
            let err = Settings::load(Path::new("settings.toml")).unwrap_err();
            assert!(err.to_string().contains("bnid"), "{err}");
            Ok(())
        });
    }
}
