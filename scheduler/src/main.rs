use anyhow::Context;
use hopper_scheduler::config::{Cli, Command};
use tracing_subscriber::fmt::MakeWriter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse_checked().command {
        Command::Serve(args) => {
            init_logging(std::io::stderr, true);
            hopper_scheduler::server::serve(args).await
        }
        Command::Up(args) => {
            // The terminal is for progress lines; the scheduler's log goes to its data dir.
            hopper_scheduler::up::create_data_dir(&args.data_dir)?;
            let path = args.data_dir.join(hopper_scheduler::up::SCHEDULER_LOG);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            init_logging(std::sync::Arc::new(log), false);
            hopper_scheduler::up::run(args).await
        }
    }
}

/// `RUST_LOG` filters the log; `info` by default.
fn init_logging<W>(writer: W, ansi: bool)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(ansi)
        .with_writer(writer)
        .init();
}
