//! The `wsrelay` binary: parse flags, start logging, run the server until SIGTERM (drain, then
//! exit) or SIGINT (close everyone, then exit).
//! Every failure to start is one line on stderr and exit code 1; `--help` lists the flags.

use std::process::ExitCode;

use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use wsrelay::cli::Cli;
use wsrelay::server::Server;

fn main() -> ExitCode {
    // Before any thread starts: large buffers are returned to the OS as soon as they are freed.
    wsrelay::trim::map_large_blocks();
    match run(Cli::parse_args()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsrelay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let config = cli.into_config()?;
    init_logging(config.log_level);
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let (delay, period) = (config.drain_delay, config.drain_period);
    let server = Server::start(config)?;
    let shutdown = server.shutdown_handle();
    std::thread::Builder::new()
        .name("wsrelay-signals".into())
        .spawn(move || {
            let mut forever = signals.forever();
            // SIGTERM (systemd, Docker, Kubernetes, a deploy script) drains: the balancer is
            // told first and clients leave gradually. SIGINT (Ctrl-C) closes everyone at once.
            match forever.next() {
                Some(SIGTERM) => {
                    info!("SIGTERM: draining (--drain-delay {delay:?}, then clients leave over --drain-period {period:?})");
                    shutdown.drain();
                }
                Some(sig) => {
                    info!("signal {sig}: shutting down");
                    shutdown.trigger();
                }
                None => {}
            }
            // A second signal means "now": skip the graceful close.
            if let Some(sig) = forever.next() {
                error!("second signal {sig}: exiting immediately");
                std::process::exit(1);
            }
        })
        .map_err(|e| format!("cannot start signal thread: {e}"))?;
    server.wait()
}

fn init_logging(level: log::LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_target_level(log::LevelFilter::Off)
        .set_thread_level(log::LevelFilter::Off)
        .build();
    // Colours only on a terminal: log files and journald get plain text.
    let color = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        simplelog::ColorChoice::Auto
    } else {
        simplelog::ColorChoice::Never
    };
    let _ = simplelog::TermLogger::init(level, config, simplelog::TerminalMode::Stderr, color);
}
