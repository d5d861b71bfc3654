//! `switchboard`: run the server (default), or `switchboard doctor` to check kernel limits.

use std::io::IsTerminal;
use std::process::ExitCode;

use switchboard::config::{Config, LogFormat};
use switchboard::server::Server;

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("doctor") {
        let code = switchboard::doctor::cli_main(&args[1..]);
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cfg = match Config::load(&args, &|k| std::env::var(k).ok()) {
        Ok(cfg) => cfg,
        Err(e) if e.key == "help" => {
            println!("{}", e.message);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    let signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("switchboard: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let server = match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("switchboard: {e}");
            return ExitCode::from(1);
        }
    };
    let mut signals = signals;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down: draining connections");
    }
    if server.shutdown() {
        // A shard died (logged): exit non-zero so the service manager restarts the node.
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
