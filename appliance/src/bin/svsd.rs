//! svsd: parse the command line, wire the library up, exit.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use svs_appliance::config::Config;
use svs_appliance::daemon::{self, RunOptions};
use svs_appliance::{SvsError, dev};

/// SVS signing daemon: SM2 signatures over an HTTPS/mTLS JSON API, keys in a PKCS#11 HSM.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/svs/svsd.toml")]
    config: PathBuf,
    /// Validate the configuration and exit (0 = valid).
    #[arg(long)]
    check_config: bool,
    /// Run a throw-away development installation (soft token, dev PKI) on 127.0.0.1.
    #[arg(long)]
    dev: bool,
    /// Directory for --dev (wiped and remade).
    #[arg(long, default_value_os_t = std::env::temp_dir().join("svs-dev"))]
    dev_dir: PathBuf,
    /// Port for --dev.
    #[arg(long, default_value_t = 8443)]
    dev_port: u16,
    /// Metrics port for --dev (127.0.0.1).
    #[arg(long, default_value_t = 9464)]
    dev_metrics_port: u16,
    /// With --dev: create the installation, print its config path, and exit.
    #[arg(long, requires = "dev")]
    dev_init_only: bool,
    /// Run even as root.
    #[arg(long)]
    allow_root: bool,
}

fn main() -> ExitCode {
    // Referenced so the linker keeps the embedded soft token's entry points.
    std::hint::black_box(svs_softtoken::C_GetFunctionList as *const ());
    let args = Args::parse();
    daemon::LogFormat::detect(
        std::io::stderr().is_terminal(),
        std::env::var_os("JOURNAL_STREAM").as_deref(),
    )
    .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, through the log (stderr): under systemd a second
            // `svsd: …` line would only repeat it in the journal.
            let code = e.exit_code();
            tracing::error!(exit_status = code, "{e}");
            ExitCode::from(code)
        }
    }
}

fn run(args: Args) -> Result<(), SvsError> {
    let config_path = if args.dev {
        if !args.dev_init_only {
            daemon::check_root(args.allow_root)?;
        }
        let setup = dev::init_with_metrics(&args.dev_dir, args.dev_port, args.dev_metrics_port)?;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "dev installation in {}", setup.dir.display());
        let _ = writeln!(out, "config: {}", setup.config.display());
        if args.dev_init_only {
            return Ok(());
        }
        let _ = writeln!(out, "\n{}", setup.curl_commands());
        let _ = out.flush();
        setup.config
    } else {
        args.config
    };
    let config = Config::load(&config_path)?;
    if args.check_config {
        if let Some(note) = daemon::check_files(&config)? {
            let _ = writeln!(std::io::stderr(), "note: {note}");
        }
        let _ = writeln!(std::io::stdout(), "{}: valid", config_path.display());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("svsd")
        .build()
        .map_err(|e| SvsError::Io(e.to_string()))?;
    let result = runtime.block_on(daemon::run(
        config,
        RunOptions {
            allow_root: args.allow_root,
        },
    ));
    // Dropping the runtime would wait for every blocking task: a start
    // attempt stopped by SIGTERM may have left one hanging in the HSM's
    // module (C_Login on an unreachable network HSM). Exit without it.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}
