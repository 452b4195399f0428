//! svs-provision: parse the command line, run it, print, exit.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use svs_provision::cli::{Cli, run};

fn main() -> ExitCode {
    // Referenced so the linker keeps the built-in soft token's entry points.
    std::hint::black_box(svs_softtoken::C_GetFunctionList as *const ());
    let cli = Cli::parse();
    let json = cli.json;
    let mut out = std::io::stdout().lock();
    match run(cli) {
        Ok(outcome) => {
            if json {
                let _ = writeln!(out, "{}", outcome.report.json);
            } else {
                if let Some(note) = outcome.note {
                    eprint!("{note}");
                }
                let _ = write!(out, "{}", outcome.report.text);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "svs-provision: {e}");
            if json {
                let body = serde_json::json!({"error": {"kind": e.kind(), "message": e.to_string(), "exit_code": e.exit_code()}});
                let _ = writeln!(out, "{body}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
