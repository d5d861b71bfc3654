//! `switchboard`: run the server (default), `switchboard doctor` to check kernel limits,
//! `switchboard config` to print every setting and where it came from, or `switchboard help` /
//! `--help` / `--version`.
//!
//! Signals: SIGTERM and SIGINT drain and stop; SIGHUP reloads the TLS certificate and key.
//!
//! Exit status: 0 after a drain or after printing help/version, 1 when the server cannot start,
//! 2 on a configuration or usage error (printed to stderr).

use std::io::IsTerminal;
use std::process::ExitCode;

use switchboard::config::{Config, LogFormat};
use switchboard::server::Server;

/// The log subscriber: the `log_level` filter, the text or JSON formatter (stamping
/// `trace_id`/`span_id` on lines inside traced spans), and, with `trace_exporter` set, the
/// trace layer (`switchboard::trace`), whose spans the filter always lets through.
fn init_logging(cfg: &Config) {
    use switchboard::trace::layer::WithTraceIds;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let mut filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let trace_layer = switchboard::trace::install(cfg);
    if trace_layer.is_some() {
        let directive = format!("{}=info", switchboard::trace::TARGET);
        filter = filter.add_directive(directive.parse().expect("a valid directive"));
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match cfg.log_format {
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .map_event_format(WithTraceIds::json),
            )
            .with(trace_layer)
            .init(),
        LogFormat::Text => registry
            .with(fmt.map_event_format(WithTraceIds::text))
            .with(trace_layer)
            .init(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("doctor") {
        let code = switchboard::doctor::cli_main(&args[1..]);
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    // Only the names: values are read one by one through the lookup below.
    let env_names: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("SWITCHBOARD_") || k.starts_with("WEBSOCKET_"))
        .collect();
    // `switchboard config [flags]`: every setting, its value and where it came from.
    let dump = args.first().map(String::as_str) == Some("config");
    let args = if dump { &args[1..] } else { &args[..] };
    let loaded = match Config::load_with_warnings(args, &|k| std::env::var(k).ok(), &env_names) {
        Ok(loaded) => loaded,
        Err(e) if e.is_help() || e.is_version() => {
            println!("{}", e.message);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    if dump {
        for w in &loaded.warnings {
            println!("# {w}");
        }
        print!("{}", loaded.dump());
        return ExitCode::SUCCESS;
    }
    let cfg = loaded.config;
    init_logging(&cfg);
    for w in &loaded.warnings {
        tracing::warn!("config: {w}");
    }
    let signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
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
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGHUP {
            // Reload the TLS certificate and key; connections stay.
            server.reload_tls();
            continue;
        }
        tracing::info!(signal = sig, "shutting down: draining connections");
        break;
    }
    if server.shutdown() {
        // A shard died (logged): exit non-zero so the service manager restarts the node.
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
