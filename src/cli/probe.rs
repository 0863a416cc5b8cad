//! `ti-scheduler probe`: is a running scheduler ready? `GET /ready`, exit status 0 when it
//! answers 2xx and 1 otherwise, with the reason on one line. For health checks where no
//! HTTP client is installed (the container image has none).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;

/// Options of `ti-scheduler probe`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// Where the scheduler is.
    #[command(flatten)]
    pub url: super::ServiceUrl,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
}

/// Asks `GET /ready`; prints `<url>: ready` on success, fails naming the answer or the
/// connection error otherwise.
pub async fn run_probe(args: &ProbeArgs, out: &mut impl Write) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.timeout.is_finite() && args.timeout > 0.0,
        "--timeout must be a positive number of seconds, got {}",
        args.timeout
    );
    let url = args.url.at("/ready");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs_f64(args.timeout))
        .build()?;
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url} did not answer"))?;
    super::answer(response, &url).await?;
    writeln!(out, "{url}: ready")?;
    Ok(())
}
