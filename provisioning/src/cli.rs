//! The command line (clap) and the dispatch to the library's commands.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::{Args, Parser, Subcommand};
use svs_hsm::{ModuleSource, Pkcs11Uri};

use crate::Report;
use crate::audit::{AuditKey, Configured, ShowFilter};
use crate::entities::{EntityChange, NewEntity, Recognise, Reload};
use crate::error::{ProvisionError, Result};
use crate::pin::{PinFiles, PinReader};
use crate::token::{Opened, Target};

const AFTER_HELP: &str = "\
PINs are never taken as arguments. Each PIN comes from its file option
(--pin-file, --so-pin-file, --new-pin-file), else from a prompt without echo
when standard input is a terminal (new PINs are asked twice), else from
standard input, one PIN per line, in the order the command needs them:
  token init: new SO PIN            pin init: SO PIN, new user PIN
  pin change: current PIN, new PIN  other commands: user PIN

Exit codes: 0 success, 2 usage or bad input, 3 not found, 4 already exists,
5 wrong PIN, 6 PIN locked, 7 certificate refused, 8 svsd configuration,
9 token or module failure, 10 audit trail broken, 11 self-test failed,
12 I/O, 13 not confirmed, 14 svsd did not confirm the reload. A refused
command changes nothing, except with 14: the entities file was changed
but svsd may still serve the previous entities.";

/// SVS provisioning: tokens, PINs, keys, certificate requests, certificates,
/// entities, audit verification and self-tests, for security officers and auditors.
#[derive(Debug, Parser)]
#[command(name = "svs-provision", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// PKCS#11 module: a library path, or "embedded" for the built-in SM2
    /// soft token (configured by $SVS_SOFTTOKEN_CONF or svsd's config).
    /// Default: svsd's [hsm] module with --config, else embedded.
    #[arg(long, global = true, value_name = "PATH|embedded")]
    pub module: Option<String>,
    /// Token: its label, or a PKCS#11 URI (pkcs11:token=…). Default: svsd's
    /// [hsm] token with --config, else the only initialised token.
    #[arg(long, global = true, value_name = "LABEL|URI")]
    pub token: Option<String>,
    /// Vendor profile (svs-softtoken, sansec, tass, thales-luna, ibm-ep11,
    /// ecdsa-p256) or "auto". Default: svsd's, else auto.
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
    /// svsd's configuration file: supplies the module, token, profile,
    /// audit directory and entities file defaults.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the result as JSON on standard output (errors too).
    #[arg(long, global = true)]
    pub json: bool,
    /// File holding the user PIN.
    #[arg(long, global = true, value_name = "FILE")]
    pub pin_file: Option<PathBuf>,
    /// File holding the SO PIN (for `token init`: the new SO PIN).
    #[arg(long, global = true, value_name = "FILE")]
    pub so_pin_file: Option<PathBuf>,
    /// File holding the new PIN for `pin init` / `pin change`.
    #[arg(long, global = true, value_name = "FILE")]
    pub new_pin_file: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Initialise or inspect tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Set or change PINs.
    #[command(subcommand)]
    Pin(PinCmd),
    /// Generate, list, show, export and delete signing keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Make a PKCS#10 certificate request for a key, signed inside the
    /// token (SM3withSM2 with the default ID; ECDSA keys: ecdsa-with-SHA256).
    /// Needs the user PIN.
    Csr(CsrArgs),
    /// Store certificates issued for keys.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Manage application entities in svsd's entities file (needs --config).
    #[command(subcommand)]
    Entity(EntityCmd),
    /// Verify and read the audit trail (no PIN needed).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Run the known-answer and pairwise self-tests svsd runs, on the token
    /// (needs the user PIN).
    Selftest {
        /// Keys to test (default: every key with a private key).
        #[arg(long = "label", value_name = "NAME")]
        labels: Vec<String>,
    },
}

/// `token …`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Give an empty token a label and an SO PIN (on the soft token: the
    /// first empty slot, or --slot). An initialised token is refused unless
    /// --reinit, which destroys every key on it and needs its SO PIN.
    Init {
        /// The new token label (1-32 bytes).
        #[arg(long)]
        label: String,
        /// Slot to initialise (default: the first empty token; with
        /// --reinit, the token already labelled --label).
        #[arg(long)]
        slot: Option<u64>,
        /// Re-initialise an initialised token, destroying every key on it:
        /// the one in --slot, else the one already labelled --label.
        #[arg(long)]
        reinit: bool,
        /// Do not ask for confirmation (with --reinit).
        #[arg(long)]
        yes: bool,
    },
    /// Show tokens: label, serial, PIN state, vendor profile, mechanisms.
    /// No PIN needed.
    Info,
}

/// `pin …`
#[derive(Debug, Subcommand)]
pub enum PinCmd {
    /// The SO sets the user PIN (also clears a user-PIN lock).
    Init,
    /// Change your own PIN: the user's, or with --so the SO's.
    Change {
        /// Change the SO PIN instead of the user PIN.
        #[arg(long)]
        so: bool,
    },
}

/// `key …`
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Generate a key pair in the token (SM2, or the profile's algorithm);
    /// the private key is sensitive and can never be exported. Prints its
    /// id and public key. Needs the user PIN.
    Generate {
        /// Key label (what svsd's [keys] and the API call it).
        #[arg(long)]
        label: String,
    },
    /// List keys: label, id, algorithm, public-key fingerprint, certificate
    /// subject and expiry. No PIN needed (with --login, also checks that each
    /// private key is present).
    List {
        /// Log in as the user to see private keys too.
        #[arg(long)]
        login: bool,
    },
    /// Show one key and its public key. No PIN needed.
    Show {
        /// Key label.
        #[arg(long)]
        label: String,
    },
    /// Write the public key as PEM SubjectPublicKeyInfo. No PIN needed.
    ExportPublic {
        /// Key label.
        #[arg(long)]
        label: String,
        /// Output file (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Delete a key: private key, public key and certificate. Asks you to
    /// type the label unless --yes. Needs the user PIN.
    Delete {
        /// Key label.
        #[arg(long)]
        label: String,
        /// Its CKA_ID in hex, to pick one of several keys sharing the label
        /// (as `key list` shows them).
        #[arg(long, value_name = "HEX")]
        id: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// `csr` arguments.
#[derive(Debug, Args)]
pub struct CsrArgs {
    /// Key label.
    #[arg(long)]
    pub label: String,
    /// Subject, RFC 4514, most specific first: "CN=signer-01,O=Bank A,C=CN".
    #[arg(long)]
    pub subject: String,
    /// Subject alternative names: DNS:name, IP:address, email:address, URI:uri
    /// (repeat, or separate with commas).
    #[arg(long = "san", value_name = "TYPE:VALUE")]
    pub sans: Vec<String>,
    /// Key usage (critical): digitalSignature, nonRepudiation, … (repeat or comma-separate).
    #[arg(long = "key-usage", value_name = "USAGE")]
    pub key_usage: Vec<String>,
    /// Output file (default: standard output).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// `cert …`
#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// Store the certificate issued for a key, with the key's id. Refuses a
    /// certificate for another key, an expired or not-yet-valid one or chain
    /// certificate, a chain signature it cannot check (--force overrides
    /// only these two), and a chain that did not issue it. Needs the user PIN.
    Import {
        /// Key label.
        #[arg(long)]
        label: String,
        /// The certificate (PEM or DER; further PEM blocks count as chain).
        #[arg(long)]
        file: PathBuf,
        /// CA certificates (PEM), stored too so svsd serves the chain.
        #[arg(long)]
        chain: Option<PathBuf>,
        /// Store even if it or a chain certificate is expired or not yet
        /// valid, or a chain signature uses an algorithm that cannot be checked.
        #[arg(long)]
        force: bool,
        /// Replace the certificate the key already has.
        #[arg(long)]
        replace: bool,
    },
}

/// How to tell svsd.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Send SIGHUP to this svsd process (checked to be svsd before anything
    /// is changed).
    #[arg(long, value_name = "PID", conflicts_with_all = ["pid_file", "no_reload"])]
    pub pid: Option<i32>,
    /// Send SIGHUP to the process whose id is in this file (checked the
    /// same way).
    #[arg(long, value_name = "FILE", conflicts_with = "no_reload")]
    pub pid_file: Option<PathBuf>,
    /// Change the file only; reload svsd later yourself.
    #[arg(long)]
    pub no_reload: bool,
}

impl ReloadArgs {
    fn how(&self) -> Reload {
        if self.no_reload {
            Reload::No
        } else if let Some(p) = self.pid {
            Reload::Pid(p)
        } else if let Some(f) = &self.pid_file {
            Reload::PidFile(f.clone())
        } else {
            Reload::Auto
        }
    }
}

/// `entity …`. Each change rewrites the entities file atomically, then asks
/// svsd to reload (`systemctl reload svsd` when systemd runs it, --pid, or
/// --pid-file).
#[derive(Debug, Subcommand)]
pub enum EntityCmd {
    /// Add an entity recognised by its client certificate.
    Add {
        /// Entity name.
        #[arg(long)]
        name: String,
        /// The entity's client certificate (PEM or DER), followed by any
        /// intermediates the client sends. It must pass svsd's handshake
        /// check against client_ca (valid now, for client authentication).
        #[arg(long)]
        cert: PathBuf,
        /// Recognise the client by its public key only (survives re-issuing
        /// with the same key) instead of the whole certificate.
        #[arg(long)]
        match_key: bool,
        /// Keys it may use (names from svsd's [keys]), comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "K1,K2")]
        keys: Vec<String>,
        /// Operations: sign, verify (comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "OPS", required = true)]
        ops: Vec<String>,
        /// Rate limit, e.g. 200/s.
        #[arg(long, value_name = "R/s")]
        rate: Option<String>,
        /// Burst size for the rate limit (default: one second's worth).
        #[arg(long)]
        burst: Option<u32>,
        /// Requests in flight at once.
        #[arg(long, value_parser = at_least_one)]
        max_concurrent: Option<usize>,
        /// Add it suspended.
        #[arg(long)]
        suspended: bool,
        #[command(flatten)]
        reload: ReloadArgs,
    },
    /// Change an entity in place: a renewed client certificate, its keys,
    /// operations or limits. Settings not named stay as they are, and so
    /// does its status.
    Update {
        /// Entity name.
        #[arg(long)]
        name: String,
        /// Its new client certificate (PEM or DER, then intermediates),
        /// checked as for `add`. The client stays recognised as it was
        /// (by whole certificate, by public key, or by subject and issuer,
        /// which a certificate renewed under the same name already meets)
        /// unless --match-cert or --match-key says otherwise.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// With --cert: recognise the client by its public key only from now on.
        #[arg(long, requires = "cert", conflicts_with = "match_cert")]
        match_key: bool,
        /// With --cert: recognise the client by the whole certificate from now on.
        #[arg(long, requires = "cert")]
        match_cert: bool,
        /// The keys it may use from now on (all of them), comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "K1,K2")]
        keys: Option<Vec<String>>,
        /// The operations from now on: sign, verify (comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "OPS")]
        ops: Option<Vec<String>>,
        /// A new rate limit, e.g. 200/s.
        #[arg(long, value_name = "R/s", conflicts_with = "no_rate")]
        rate: Option<String>,
        /// Burst size for the new rate limit (default: one second's worth).
        #[arg(long, requires = "rate")]
        burst: Option<u32>,
        /// Remove the rate limit.
        #[arg(long)]
        no_rate: bool,
        /// A new cap on requests in flight at once.
        #[arg(long, conflicts_with = "no_max_concurrent", value_parser = at_least_one)]
        max_concurrent: Option<usize>,
        /// Remove the cap (svsd's [limits] default_max_concurrent applies).
        #[arg(long)]
        no_max_concurrent: bool,
        #[command(flatten)]
        reload: ReloadArgs,
    },
    /// List entities.
    List,
    /// Suspend an entity, or with --all every entity of the entities file
    /// in one reload (an emergency: a key possibly compromised); their
    /// requests are refused from the reload on.
    Suspend {
        /// Entity name.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every entity in the entities file.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        reload: ReloadArgs,
    },
    /// Resume a suspended entity.
    Resume {
        /// Entity name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        reload: ReloadArgs,
    },
    /// Remove an entity (asks you to type its name unless --yes).
    Remove {
        /// Entity name.
        #[arg(long)]
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        reload: ReloadArgs,
    },
}

/// A count that must be at least 1 (svsd refuses 0), refused as bad usage
/// (exit 2) rather than as an invalid configuration after the edit.
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

/// `audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Walk the hash chain of every record and check every checkpoint
    /// signature; report the first break precisely (exit code 10).
    Verify {
        /// Audit directory (default: svsd's [audit] dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The audit key's public key or certificate (PEM; SM2, or P-256 where the HSM profile signs with ECDSA).
        #[arg(long, value_name = "FILE", conflicts_with_all = ["key", "skip_signatures"])]
        public_key: Option<PathBuf>,
        /// The audit key's label on the token (default: svsd's
        /// [audit] checkpoint_key with --config). Reads only its public half.
        #[arg(long, value_name = "LABEL", conflicts_with = "skip_signatures")]
        key: Option<String>,
        /// Check hashes and order only, not checkpoint signatures (this
        /// does not detect deliberate rewriting of the files).
        #[arg(long)]
        skip_signatures: bool,
        /// svsd's checkpoint interval in seconds (default: svsd's [audit]
        /// checkpoint_interval_s with --config, else svsd's default 300).
        /// Records after the newest signed checkpoint may span no longer.
        #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
        checkpoint_interval: Option<u64>,
        /// The trail was pruned on purpose and starts at this seq: accept
        /// that records before it are missing (default: it must start at 1).
        #[arg(long, value_name = "SEQ", value_parser = clap::value_parser!(u64).range(2..))]
        from_seq: Option<u64>,
        /// svsd is running: the newest signed checkpoint must also be recent
        /// by the clock (shows newest records or files removed).
        #[arg(long, conflicts_with = "skip_signatures")]
        live: bool,
    },
    /// Show the audit anchor: the trail's last checkpointed head, which svsd
    /// keeps on the token and compares with the trail at start. With
    /// --reset, delete it, so that svsd starts a new trail (asks you to type
    /// the label unless --yes). Needs the user PIN.
    Anchor {
        /// The anchor's label on the token (default: svsd's [audit]
        /// anchor_object with --config, else svs-audit-anchor).
        #[arg(long, value_name = "LABEL")]
        label: Option<String>,
        /// Delete the anchor.
        #[arg(long)]
        reset: bool,
        /// With --reset: do not ask for confirmation.
        #[arg(long, requires = "reset")]
        yes: bool,
    },
    /// List records, oldest first (does not verify them: `audit verify` does).
    Show {
        /// Audit directory (default: svsd's [audit] dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// From this time on (UTC: 2026-01-31 or 2026-01-31T08:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Before this time.
        #[arg(long)]
        until: Option<String>,
        /// Only this entity.
        #[arg(long)]
        entity: Option<String>,
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
        /// Only this record type.
        #[arg(long = "type", value_name = "TYPE", value_parser = [
            "op", "start", "stop", "reload", "selftest", "anomaly", "refusals_suppressed", "checkpoint",
        ])]
        kind: Option<String>,
        /// Only the last N matching records.
        #[arg(long, value_name = "N")]
        last: Option<usize>,
    },
}

/// What `run` hands back: the report, and whether its text is data for
/// standard output (a PEM) rather than a message.
#[derive(Debug)]
pub struct Outcome {
    /// The report.
    pub report: Report,
    /// A note for standard error when the text is data.
    pub note: Option<String>,
}

impl From<Report> for Outcome {
    fn from(report: Report) -> Self {
        Outcome { report, note: None }
    }
}

/// The options of a command line that choose svsd's configuration, the
/// module, the token and the profile.
#[derive(Debug, Clone, Default)]
struct Selecting {
    config: Option<PathBuf>,
    module: Option<String>,
    token: Option<String>,
    profile: Option<String>,
}

/// This command line's selecting options, for the commands that messages
/// suggest: with another configuration or module than the default, the
/// bare command would act on another token. A process-wide value because
/// those messages are made deep in the library (error mapping included),
/// where the command line is not at hand; a process runs one command.
static SELECTING: OnceLock<Selecting> = OnceLock::new();

impl Selecting {
    fn of(cli: &Cli) -> Selecting {
        Selecting {
            config: cli.config.clone(),
            module: cli.module.clone(),
            token: cli.token.clone(),
            profile: cli.profile.clone(),
        }
    }

    fn command(&self, token: Option<&str>, rest: &str) -> String {
        let config = self.config.as_ref().map(|c| c.to_string_lossy());
        let mut words = vec![Cow::Borrowed("svs-provision")];
        for (option, value) in [
            ("-c", config.as_deref()),
            ("--module", self.module.as_deref()),
            ("--token", token),
            ("--profile", self.profile.as_deref()),
        ] {
            if let Some(v) = value {
                words.push(option.into());
                words.push(shell_word(v));
            }
        }
        words.push(rest.into());
        words.join(" ")
    }
}

/// `svs-provision`, the selecting options given on this command line, and
/// `rest`: a command to suggest in a message.
pub fn command(rest: &str) -> String {
    let selecting = SELECTING.get_or_init(Selecting::default);
    selecting.command(selecting.token.as_deref(), rest)
}

/// [`command`] for the token labelled `token` instead of the one given
/// (`None`: no --token at all, for commands that make tokens).
pub fn command_for_token(token: Option<&str>, rest: &str) -> String {
    SELECTING
        .get_or_init(Selecting::default)
        .command(token, rest)
}

/// `s` as one word for a POSIX shell, quoted only when it needs to be.
pub fn shell_word(s: &str) -> Cow<'_, str> {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c));
    if plain {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("'{}'", s.replace('\'', r"'\''")))
    }
}

fn target(cli: &Cli, config: Option<&svs_appliance::config::Config>) -> Result<Target> {
    let mut t = Target {
        profile: "auto".into(),
        ..Target::default()
    };
    if let Some(c) = config {
        t.module = c.hsm.module.clone();
        t.label = c.hsm.token_label.clone();
        t.serial = c.hsm.token_serial.clone();
        t.uri = c.hsm.uri.as_deref().map(Pkcs11Uri::parse).transpose()?;
        t.profile = c.hsm.profile.clone();
        t.profiles = c.hsm.profiles.clone();
        t.embedded_config = c.embedded_token_config.clone();
    }
    if let Some(m) = &cli.module {
        t.module = if m == "embedded" {
            ModuleSource::Embedded
        } else {
            let p = PathBuf::from(m);
            if !p.exists() {
                return Err(ProvisionError::NotFound(format!(
                    "PKCS#11 module {m} does not exist (give the vendor's library path, or \"embedded\")"
                )));
            }
            ModuleSource::Path(p)
        };
    }
    if let Some(tok) = &cli.token {
        t.label = None;
        t.serial = None;
        t.uri = None;
        if tok.starts_with("pkcs11:") {
            let uri = Pkcs11Uri::parse(tok)?;
            if uri.has_pin_value {
                return Err(ProvisionError::Usage(
                    "the PKCS#11 URI carries pin-value: PINs are never given on the command line; use --pin-file or the prompt".into(),
                ));
            }
            if let Some(p) = &uri.module_path {
                t.module = ModuleSource::Path(p.into());
            }
            t.uri = Some(uri);
        } else {
            t.label = Some(tok.clone());
        }
    }
    if let Some(p) = &cli.profile {
        t.profile = p.clone();
    }
    Ok(t)
}

/// Writes `-o`'s file whole or not at all: a full disk must leave no empty
/// CSR behind, nor an earlier one cut short. A device or pipe
/// (`-o /dev/stdout`) is written to as it is.
fn write_out(path: &Path, text: &str) -> Result<()> {
    let special = std::fs::metadata(path).is_ok_and(|m| !m.is_file());
    let written = if special {
        std::fs::write(path, text)
    } else {
        crate::replace::Replacement::write(path, text.as_bytes(), 0o644).and_then(|r| r.commit())
    };
    written.map_err(|e| {
        ProvisionError::Io(format!(
            "cannot write {}: {e}; nothing was written there",
            path.display()
        ))
    })
}

/// Refuses an `-o` that [`write_out`] could not write.
fn check_out(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(ProvisionError::Usage(format!(
                "{} is a directory: give -o a file name; nothing was done",
                path.display()
            )));
        }
        // A device or pipe (-o /dev/stdout) is written to as it is.
        Ok(m) if !m.is_file() => return Ok(()),
        _ => {}
    }
    crate::replace::Replacement::check(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ProvisionError::NotFound(format!(
                "cannot write {}: its directory does not exist; nothing was done",
                path.display()
            ))
        } else {
            ProvisionError::Io(format!(
                "cannot write {}: no file can be made in its directory ({e}); nothing was done",
                path.display()
            ))
        }
    })
}

fn need_config(
    cli: &Cli,
    config: Option<svs_appliance::config::Config>,
) -> Result<(PathBuf, svs_appliance::config::Config)> {
    match (cli.config.clone(), config) {
        (Some(p), Some(c)) => Ok((p, c)),
        _ => Err(ProvisionError::Usage(
            "entities live in svsd's configuration: give --config /etc/svs/svsd.toml".into(),
        )),
    }
}

/// Whether `command` creates, changes or destroys token objects or PINs:
/// those run one at a time on this host ([`crate::token::lock_changes`]).
fn changes_tokens(command: &Command) -> bool {
    match command {
        Command::Token(TokenCmd::Init { .. })
        | Command::Pin(_)
        | Command::Key(KeyCmd::Generate { .. } | KeyCmd::Delete { .. })
        | Command::Cert(CertCmd::Import { .. }) => true,
        Command::Audit(AuditCmd::Anchor { reset, .. }) => *reset,
        _ => false,
    }
}

/// What `command` would ask the officer to confirm, when it cannot ask:
/// no terminal, and no `--yes`. (`token init --reinit` first checks the
/// labels on the token, whose refusals say more.)
fn unconfirmable(command: &Command) -> Option<&'static str> {
    if crate::pin::stdin_is_tty() {
        return None;
    }
    match command {
        Command::Key(KeyCmd::Delete { yes: false, .. }) => Some("deleting a key"),
        _ => None,
    }
}

/// Runs a parsed command line. A command that changes a token holds the
/// host's change lock ([`crate::token::lock_changes`]) from before it
/// opens the module: a run that only read the token while another wrote
/// it saw it torn (SoftHSMv2 rewrites its files in place: the token was
/// "not found"). The lock is given up while a prompt waits for the officer
/// ([`crate::token::released_while`]), and each command's check-then-create
/// step takes it again.
pub fn run(cli: Cli) -> Result<Outcome> {
    let _ = SELECTING.set(Selecting::of(&cli));
    let config = cli
        .config
        .as_deref()
        .map(|path| match &cli.command {
            // The edit may be what repairs svsd's entities file; it is
            // judged by its result ([`crate::entities::load_for_edit`]).
            Command::Entity(cmd) if !matches!(cmd, EntityCmd::List) => {
                crate::entities::load_for_edit(path).map(|e| e.config)
            }
            _ => crate::entities::load_config(path),
        })
        .transpose()?;
    let mut pins = PinReader::new(PinFiles {
        user: cli.pin_file.clone(),
        so: cli.so_pin_file.clone(),
        new: cli.new_pin_file.clone(),
    });
    let t = target(&cli, config.as_ref())?;
    // A confirmation that cannot be asked is refused before the lock is
    // waited for, rather than after.
    if let Some(question) = unconfirmable(&cli.command) {
        return Err(ProvisionError::Cancelled(format!(
            "{question}: cannot ask for confirmation without a terminal; pass --yes to confirm. Nothing was changed"
        )));
    }
    let _changing = if changes_tokens(&cli.command) {
        Some(crate::token::lock_changes()?)
    } else {
        None
    };
    match &cli.command {
        Command::Token(TokenCmd::Init {
            label,
            slot,
            reinit,
            yes,
        }) => Ok(crate::token::init(&t, label, *slot, *reinit, *yes, &mut pins)?.into()),
        Command::Token(TokenCmd::Info) => Ok(crate::token::info(&t)?.into()),
        Command::Pin(PinCmd::Init) => Ok(crate::token::pin_init(&t, &mut pins)?.into()),
        Command::Pin(PinCmd::Change { so }) => {
            Ok(crate::token::pin_change(&t, *so, &mut pins)?.into())
        }
        Command::Key(cmd) => {
            let opened = Opened::open(&t)?;
            match cmd {
                KeyCmd::Generate { label } => {
                    Ok(crate::keys::generate(&opened, &mut pins, label)?.into())
                }
                KeyCmd::List { login } => Ok(crate::keys::list(
                    &opened,
                    if *login { Some(&mut pins) } else { None },
                )?
                .into()),
                KeyCmd::Show { label } => Ok(crate::keys::show(&opened, label)?.into()),
                KeyCmd::ExportPublic { label, out } => {
                    let (key, pem) = crate::keys::export_public(&opened, label)?;
                    let json = serde_json::json!({
                        "label": label,
                        "spki_sha256": key.fingerprint(),
                        "public_key": pem,
                    });
                    match out {
                        Some(path) => {
                            write_out(path, &pem)?;
                            Ok(Report {
                                text: format!(
                                    "public key of '{label}' written to {} (spki_sha256 {})\n",
                                    path.display(),
                                    key.fingerprint()
                                ),
                                json,
                            }
                            .into())
                        }
                        None => Ok(Outcome {
                            report: Report { text: pem, json },
                            note: None,
                        }),
                    }
                }
                KeyCmd::Delete { label, id, yes } => {
                    // Deleting a key svsd still serves would take signing
                    // (or audit checkpoints) down at its next start.
                    if let Some(c) = &config {
                        let exposed: Vec<&String> = c
                            .keys
                            .iter()
                            .filter(|(_, k)| &k.object == label)
                            .map(|(name, _)| name)
                            .collect();
                        if !exposed.is_empty() || c.audit.checkpoint_key.as_ref() == Some(label) {
                            return Err(ProvisionError::Usage(format!(
                                "key '{label}' is in use by svsd ({}); remove it from {} first. Nothing was deleted",
                                if exposed.is_empty() {
                                    "it is the audit checkpoint key".to_string()
                                } else {
                                    format!("exposed in [keys] as {exposed:?}")
                                },
                                c.path.display()
                            )));
                        }
                    }
                    Ok(crate::keys::delete(&opened, &mut pins, label, id.as_deref(), *yes)?.into())
                }
            }
        }
        Command::Csr(a) => {
            let opts = crate::csr::CsrOptions {
                subject: a.subject.clone(),
                sans: a.sans.clone(),
                key_usage: a.key_usage.clone(),
            };
            // Before the token: a mistake found after the PIN would have
            // used a login, and after signing, thrown the request away.
            crate::csr::check_options(&opts)?;
            if let Some(path) = &a.out {
                check_out(path)?;
            }
            let opened = Opened::open(&t)?;
            let (pem, report) = crate::csr::csr(&opened, &mut pins, &a.label, &opts)?;
            match &a.out {
                Some(path) => {
                    write_out(path, &pem)?;
                    Ok(Report {
                        text: format!("{}written to {}\n", report.text, path.display()),
                        json: report.json,
                    }
                    .into())
                }
                None => Ok(Outcome {
                    note: Some(report.text),
                    report: Report {
                        text: pem,
                        json: report.json,
                    },
                }),
            }
        }
        Command::Cert(CertCmd::Import {
            label,
            file,
            chain,
            force,
            replace,
        }) => {
            let opened = Opened::open(&t)?;
            Ok(crate::cert::import(
                &opened,
                &mut pins,
                label,
                file,
                chain.as_deref(),
                crate::cert::ImportOptions {
                    force: *force,
                    replace: *replace,
                },
            )?
            .into())
        }
        Command::Entity(cmd) => {
            let (path, _) = need_config(&cli, config)?;
            match cmd {
                EntityCmd::Add {
                    name,
                    cert,
                    match_key,
                    keys,
                    ops,
                    rate,
                    burst,
                    max_concurrent,
                    suspended,
                    reload,
                } => Ok(crate::entities::add(
                    &path,
                    &NewEntity {
                        name: name.clone(),
                        cert: cert.clone(),
                        match_certificate: !match_key,
                        keys: keys.clone(),
                        ops: ops.clone(),
                        rate: rate.clone(),
                        burst: *burst,
                        max_concurrent: *max_concurrent,
                        suspended: *suspended,
                    },
                    &reload.how(),
                )?
                .into()),
                EntityCmd::Update {
                    name,
                    cert,
                    match_key,
                    match_cert,
                    keys,
                    ops,
                    rate,
                    burst,
                    no_rate,
                    max_concurrent,
                    no_max_concurrent,
                    reload,
                } => Ok(crate::entities::update(
                    &path,
                    name,
                    &EntityChange {
                        cert: cert.clone().map(|c| {
                            let how = match (match_key, match_cert) {
                                (true, _) => Recognise::PublicKey,
                                (_, true) => Recognise::Certificate,
                                _ => Recognise::AsNow,
                            };
                            (c, how)
                        }),
                        keys: keys.clone(),
                        ops: ops.clone(),
                        rate: rate.clone().map(|r| (r, *burst)),
                        no_rate: *no_rate,
                        max_concurrent: *max_concurrent,
                        no_max_concurrent: *no_max_concurrent,
                    },
                    &reload.how(),
                )?
                .into()),
                EntityCmd::List => Ok(crate::entities::list(&path)?.into()),
                EntityCmd::Suspend { name, all, reload } => match (name, all) {
                    (Some(name), false) => {
                        Ok(crate::entities::set_status(&path, name, true, &reload.how())?.into())
                    }
                    _ => Ok(crate::entities::suspend_all(&path, &reload.how())?.into()),
                },
                EntityCmd::Resume { name, reload } => {
                    Ok(crate::entities::set_status(&path, name, false, &reload.how())?.into())
                }
                EntityCmd::Remove { name, yes, reload } => {
                    Ok(crate::entities::remove(&path, name, *yes, &reload.how())?.into())
                }
            }
        }
        Command::Audit(AuditCmd::Verify {
            dir,
            public_key,
            key,
            skip_signatures,
            checkpoint_interval,
            from_seq,
            live,
        }) => {
            let dir = crate::audit::dir_from(dir.clone(), config.as_ref())?;
            let interval = match (checkpoint_interval, &config) {
                (Some(s), _) => Some(std::time::Duration::from_secs(*s)),
                (None, Some(c)) => c.audit.checkpoint_interval,
                (None, None) => Some(std::time::Duration::from_secs(300)),
            };
            if interval.is_none() && !*skip_signatures {
                return Err(ProvisionError::Usage(
                    "svsd's configuration writes no checkpoints (checkpoint_interval_s = 0), so no signature covers the trail: give --checkpoint-interval if it did write them, or --skip-signatures".into(),
                ));
            }
            let args = crate::audit::VerifyArgs {
                checkpoint_interval: interval,
                from_seq: *from_seq,
                live: *live,
            };
            let audit_key = if *skip_signatures {
                AuditKey::Skip
            } else if let Some(f) = public_key {
                let (algorithm, point) = crate::cert::point_from_file(f)?;
                AuditKey::Point {
                    algorithm,
                    point,
                    source: f.display().to_string(),
                }
            } else {
                let label = key
                    .clone()
                    .or_else(|| config.as_ref().and_then(|c| c.audit.checkpoint_key.clone()))
                    .ok_or_else(|| {
                        ProvisionError::Usage(
                            "which audit key? give --public-key FILE, --key LABEL (read from the token), --config (svsd's checkpoint_key), or --skip-signatures".into(),
                        )
                    })?;
                let opened = Opened::open(&t)?;
                let session = opened.public_session()?;
                let k = crate::keys::find(&session, &opened.profile, &label, &opened.label)?;
                AuditKey::Point {
                    algorithm: k.algorithm,
                    point: k.point.clone(),
                    source: format!("key '{label}' (spki_sha256 {})", k.fingerprint()),
                }
            };
            Ok(crate::audit::verify(&dir, &audit_key, &args)?.into())
        }
        Command::Audit(AuditCmd::Anchor { label, reset, yes }) => {
            let label = label
                .clone()
                .or_else(|| config.as_ref().and_then(|c| c.audit.anchor_object.clone()))
                .unwrap_or_else(|| svs_appliance::config::DEFAULT_ANCHOR_OBJECT.to_owned());
            let opened = Opened::open(&t)?;
            Ok(crate::audit::anchor(&opened, &mut pins, &label, *reset, *yes)?.into())
        }
        Command::Audit(AuditCmd::Show {
            dir,
            since,
            until,
            entity,
            key,
            kind,
            last,
        }) => {
            let dir = crate::audit::dir_from(dir.clone(), config.as_ref())?;
            let configured = config.as_ref().map(|c| Configured {
                entities: c.entities.iter().map(|e| e.name.clone()).collect(),
                keys: c
                    .keys
                    .keys()
                    .cloned()
                    .chain(c.audit.checkpoint_key.clone())
                    .collect(),
            });
            let (report, note) = crate::audit::show(
                &dir,
                &ShowFilter {
                    since: since.clone(),
                    until: until.clone(),
                    entity: entity.clone(),
                    key: key.clone(),
                    kind: kind.clone(),
                    last: *last,
                    configured,
                },
            )?;
            Ok(Outcome { report, note })
        }
        Command::Selftest { labels } => {
            let opened = Opened::open(&t)?;
            let mut labels = labels.clone();
            if labels.is_empty()
                && let Some(c) = &config
            {
                // The keys svsd tests: the exposed ones and the audit key.
                labels = c.keys.values().map(|k| k.object.clone()).collect();
                labels.extend(c.audit.checkpoint_key.clone());
            }
            Ok(crate::selftest::run(&opened, &mut pins, &labels)?.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent_and_has_no_pin_argument() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        assert!(!help.contains("--pin "), "{help}");
        assert!(help.contains("Exit codes"), "{help}");
    }

    #[test]
    fn the_help_names_every_exit_code() {
        use crate::error::ProvisionError as E;
        let all = [
            E::Usage(String::new()),
            E::NotFound(String::new()),
            E::AlreadyExists(String::new()),
            E::PinIncorrect(String::new()),
            E::PinLocked(String::new()),
            E::Certificate(String::new()),
            E::Config(String::new()),
            E::Token(String::new()),
            E::AuditBroken(String::new()),
            E::SelftestFailed(String::new()),
            E::Io(String::new()),
            E::Cancelled(String::new()),
            E::NotReloaded(String::new()),
        ];
        let words: Vec<&str> = AFTER_HELP
            .split(|c: char| c.is_whitespace() || c == ',')
            .collect();
        for e in all {
            let code = e.exit_code().to_string();
            assert!(
                words.contains(&code.as_str()),
                "exit {code} ({}) missing",
                e.kind()
            );
        }
    }

    #[test]
    fn suggested_commands_repeat_the_selecting_options_as_typed() {
        let cli = Cli::parse_from([
            "svs-provision",
            "--pin-file",
            "/root/pin",
            "-c",
            "/srv/svs test/svsd.toml",
            "--module",
            "/opt/hsm/lib.so",
            "--token",
            "pkcs11:token=svs;serial=7",
            "key",
            "list",
        ]);
        let s = Selecting::of(&cli);
        assert_eq!(
            s.command(s.token.as_deref(), "pin init"),
            "svs-provision -c '/srv/svs test/svsd.toml' --module /opt/hsm/lib.so --token 'pkcs11:token=svs;serial=7' pin init"
        );
        assert_eq!(
            s.command(Some("new"), "pin init"),
            "svs-provision -c '/srv/svs test/svsd.toml' --module /opt/hsm/lib.so --token new pin init"
        );
        assert_eq!(
            Selecting::default().command(None, "token info"),
            "svs-provision token info"
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn uri_with_pin_value_is_refused() {
        let cli = Cli::parse_from([
            "svs-provision",
            "--token",
            "pkcs11:token=svs?pin-value=1234",
            "token",
            "info",
        ]);
        let e = target(&cli, None).unwrap_err();
        assert!(e.to_string().contains("pin-value"), "{e}");
        assert!(!e.to_string().contains("1234"), "{e}");
    }
}
