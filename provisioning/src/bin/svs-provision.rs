//! svs-provision: parse the command line, run it, print, exit.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use svs_provision::cli::{Cli, run};
use svs_provision::error::ProvisionError;

fn main() -> ExitCode {
    // Referenced so the linker keeps the built-in soft token's entry points.
    std::hint::black_box(svs_softtoken::C_GetFunctionList as *const ());
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // The command line did not parse, so --json is looked for by
            // hand: a script asking for JSON gets it for usage errors too.
            let json = std::env::args_os().any(|a| a == "--json");
            let _ = e.print();
            // clap's first paragraph, without its "error: " and the usage.
            let text = e.render().to_string();
            let message = text
                .lines()
                .take_while(|l| !l.is_empty())
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            let message = message
                .strip_prefix("error: ")
                .unwrap_or(&message)
                .to_owned();
            return fail(&ProvisionError::Usage(message), json, false);
        }
    };
    let json = cli.json;
    let (text, note) = match run(cli) {
        Ok(outcome) if json => (format!("{}\n", outcome.report.json), None),
        Ok(outcome) => (outcome.report.text, outcome.note),
        Err(e) => return fail(&e, json, true),
    };
    if let Some(note) = note {
        eprint!("{note}");
    }
    // Output that did not reach its file (a full disk, a closed pipe) is
    // a failure: a CSR or public key redirected there would be empty.
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let e = ProvisionError::Io(format!("cannot write the output: {e}"));
            let _ = writeln!(std::io::stderr(), "svs-provision: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Reports `e` on standard error (if `say`: clap has said it already
/// otherwise) and, with `--json`, on standard output; returns its exit
/// code.
fn fail(e: &ProvisionError, json: bool, say: bool) -> ExitCode {
    if say {
        let _ = writeln!(std::io::stderr(), "svs-provision: {e}");
    }
    if json {
        let body = serde_json::json!({"error": {"kind": e.kind(), "message": e.to_string(), "exit_code": e.exit_code()}});
        let _ = writeln!(std::io::stdout(), "{body}");
    }
    ExitCode::from(e.exit_code())
}
