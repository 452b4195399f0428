//! Where PINs come from: a file named on the command line, a prompt without
//! echo when standard input is a terminal, or one line of standard input
//! per PIN otherwise. Never a command-line argument (it would sit in shell
//! history and in `/proc/*/cmdline` for every local user to read).
//!
//! PINs only live in `Zeroizing` buffers; nothing here formats one.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::termios::{self, LocalModes, OptionalActions};
use zeroize::Zeroizing;

use crate::error::{ProvisionError, Result};

/// Longest PIN line read from standard input or a terminal (PKCS#11 tokens
/// allow at most 255 bytes; anything longer is a mistake, not a PIN).
const MAX_LINE: usize = 1024;

/// Whose PIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The token user (svsd logs in as this one).
    User,
    /// The security officer.
    So,
}

impl Role {
    /// "user" or "SO", for prompts and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::So => "SO",
        }
    }
}

/// PIN files given on the command line.
#[derive(Debug, Clone, Default)]
pub struct PinFiles {
    /// `--pin-file`: the current user PIN.
    pub user: Option<PathBuf>,
    /// `--so-pin-file`: the current SO PIN (the new one for `token init`).
    pub so: Option<PathBuf>,
    /// `--new-pin-file`: the new PIN for `pin init` / `pin change`.
    pub new: Option<PathBuf>,
}

/// Reads PINs in the order a command needs them.
#[derive(Debug)]
pub struct PinReader {
    files: PinFiles,
    tty: bool,
}

impl PinReader {
    /// A reader that prompts when standard input is a terminal.
    pub fn new(files: PinFiles) -> PinReader {
        PinReader {
            files,
            tty: stdin_is_tty(),
        }
    }

    /// The current PIN of `role`, refused unless it is within the token's
    /// length limits `min..=max` (0: none): such a PIN cannot be right,
    /// and trying it would use up one of the token's login attempts (a
    /// `--pin-file` naming the wrong file, given a few times, would lock
    /// the PIN svsd logs in with).
    pub fn current(&mut self, role: Role, min: usize, max: usize) -> Result<Zeroizing<String>> {
        let file = match role {
            Role::User => self.files.user.clone(),
            Role::So => self.files.so.clone(),
        };
        let pin = match file {
            Some(f) => read_file(&f)?,
            None => self.interactive(&format!("{} PIN: ", role.name()), false)?,
        };
        let n = pin.len();
        if (min > 0 && n < min) || (max > 0 && n > max) {
            return Err(ProvisionError::Usage(format!(
                "the {} PIN given is {n} bytes long, but the token's PINs are {min} to {max}: it was not tried, so no login attempt was used up",
                role.name()
            )));
        }
        Ok(pin)
    }

    /// A new PIN for `role`, checked against the token's length limits.
    /// From a file: `--new-pin-file` (for `token init`, the SO PIN's own
    /// file, as there is no current SO PIN then). On a terminal it is asked
    /// twice.
    pub fn new_pin(
        &mut self,
        role: Role,
        from_so_file: bool,
        min: usize,
        max: usize,
    ) -> Result<Zeroizing<String>> {
        let file = if from_so_file {
            self.files.so.clone()
        } else {
            self.files.new.clone()
        };
        let pin = match file {
            Some(f) => read_file(&f)?,
            None => self.interactive(&format!("new {} PIN: ", role.name()), true)?,
        };
        check_length(&pin, role, min, max)?;
        Ok(pin)
    }

    fn interactive(&mut self, prompt: &str, confirm: bool) -> Result<Zeroizing<String>> {
        if !self.tty {
            return read_stdin_line().and_then(|p| {
                p.ok_or_else(|| {
                    ProvisionError::Usage(format!(
                        "no {}: standard input ended. Give it in a file (--pin-file, --so-pin-file, --new-pin-file) or one PIN per line on standard input",
                        prompt.trim_end_matches(": ")
                    ))
                })
            });
        }
        let first = prompt_hidden(prompt)?;
        if confirm {
            let again = prompt_hidden(&format!("repeat {prompt}"))?;
            if first.as_bytes() != again.as_bytes() {
                return Err(ProvisionError::Usage(
                    "the two PINs typed differ; nothing was changed".into(),
                ));
            }
        }
        Ok(first)
    }
}

/// Is standard input a terminal (so that we may prompt)?
pub fn stdin_is_tty() -> bool {
    termios::isatty(std::io::stdin())
}

/// Is standard error a terminal (so that progress notes make sense)?
pub fn stderr_is_tty() -> bool {
    termios::isatty(std::io::stderr())
}

fn check_length(pin: &str, role: Role, min: usize, max: usize) -> Result<()> {
    let n = pin.len();
    if (min > 0 && n < min) || (max > 0 && n > max) {
        return Err(ProvisionError::Usage(format!(
            "the new {} PIN must be {min} to {max} bytes long (the token's limits); nothing was changed",
            role.name()
        )));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Zeroizing<String>> {
    // svs-hsm's reader: one trailing newline ignored, never echoes content.
    let pin = svs_hsm::PinSource::File(path.to_path_buf())
        .read()
        .map_err(|e| ProvisionError::Usage(format!("{e}")))?;
    if let Some(who) = std::fs::metadata(path)
        .ok()
        .and_then(|m| readable_by_others(m.permissions().mode()))
    {
        eprintln!(
            "svs-provision: warning: PIN file {} can be read by {who}; make it private with `chmod 600 {}`",
            path.display(),
            crate::cli::shell_word(&path.to_string_lossy())
        );
    }
    // Taken whole, a second line would make a wrong PIN and use up one of
    // the token's tries.
    if pin.contains(['\n', '\r']) {
        return Err(ProvisionError::Usage(format!(
            "PIN file {} holds more than one line: it must hold only the PIN (a final newline is fine). It was not tried, so no login attempt was used up",
            path.display()
        )));
    }
    Ok(pin)
}

/// Who besides the owner may read a file of `mode`, if anyone.
fn readable_by_others(mode: u32) -> Option<&'static str> {
    match (mode & 0o040 != 0, mode & 0o004 != 0) {
        (true, true) => Some("its group and all users"),
        (true, false) => Some("its group"),
        (false, true) => Some("all users"),
        (false, false) => None,
    }
}

/// One line of standard input, without its line ending; `None` at EOF.
fn read_stdin_line() -> Result<Option<Zeroizing<String>>> {
    read_line_fd(std::io::stdin().as_fd())
}

/// One line read from `fd`, without its line ending; `None` at EOF.
fn read_line_fd(fd: BorrowedFd<'_>) -> Result<Option<Zeroizing<String>>> {
    // Straight from the descriptor, one byte per read: std's `Stdin` reads
    // ahead into its own 8 KiB buffer, which is never zeroized and would
    // keep the PIN (and the next ones) after we are done. Byte-wise also
    // leaves whatever follows the line unread. The buffer is reserved up
    // front so that no reallocation leaves a copy of the PIN in freed memory.
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_LINE + 1));
    let mut byte = Zeroizing::new([0u8; 1]);
    let mut any = false;
    loop {
        match rustix::io::read(fd, &mut byte[..]) {
            Ok(0) => break,
            Ok(_) => {
                any = true;
                if byte[0] == b'\n' {
                    break;
                }
                if buf.len() >= MAX_LINE {
                    return Err(ProvisionError::Usage(
                        "a PIN line on standard input is too long".into(),
                    ));
                }
                buf.push(byte[0]);
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                return Err(ProvisionError::Io(format!(
                    "cannot read standard input: {e}"
                )));
            }
        }
    }
    if !any {
        return Ok(None);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    let text = std::str::from_utf8(&buf)
        .map_err(|_| ProvisionError::Usage("a PIN on standard input is not UTF-8".into()))?;
    if text.is_empty() {
        return Err(ProvisionError::Usage(
            "an empty line was read where a PIN was expected".into(),
        ));
    }
    Ok(Some(Zeroizing::new(text.to_owned())))
}

/// Restores the terminal's modes when dropped, so echo comes back even when
/// reading fails.
struct EchoOff {
    saved: termios::Termios,
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

fn prompt_hidden(prompt: &str) -> Result<Zeroizing<String>> {
    crate::token::released_while(|| prompt_hidden_now(prompt))?
}

fn prompt_hidden_now(prompt: &str) -> Result<Zeroizing<String>> {
    let io = |e: std::io::Error| ProvisionError::Io(format!("terminal: {e}"));
    let mut err = std::io::stderr().lock();
    write!(err, "{prompt}").map_err(io)?;
    err.flush().map_err(io)?;
    let saved = termios::tcgetattr(std::io::stdin()).map_err(|e| io(e.into()))?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    // Keep ECHONL so the cursor moves on after Enter.
    quiet.local_modes.insert(LocalModes::ECHONL);
    termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &quiet).map_err(|e| io(e.into()))?;
    let guard = EchoOff { saved };
    let line = read_stdin_line();
    drop(guard);
    line?.ok_or_else(|| ProvisionError::Cancelled("no PIN typed; nothing was changed".into()))
}

/// Asks the operator to type `expected` to go ahead. Without a terminal it
/// cannot ask, and refuses: the caller must pass `--yes` instead.
pub fn confirm(question: &str, expected: &str) -> Result<()> {
    if !stdin_is_tty() {
        return Err(ProvisionError::Cancelled(format!(
            "{question}: cannot ask for confirmation without a terminal; pass --yes to confirm. Nothing was changed"
        )));
    }
    let io = |e: std::io::Error| ProvisionError::Io(format!("terminal: {e}"));
    let mut err = std::io::stderr().lock();
    write!(err, "{question}\nType {expected:?} to confirm: ").map_err(io)?;
    err.flush().map_err(io)?;
    drop(err);
    let mut line = String::new();
    crate::token::released_while(|| std::io::stdin().read_line(&mut line))?.map_err(io)?;
    if line.trim_end_matches(['\n', '\r']) == expected {
        Ok(())
    } else {
        Err(ProvisionError::Cancelled(
            "not confirmed; nothing was changed".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn lengths_are_checked_without_echoing_the_pin() {
        let e = check_length("12", Role::User, 4, 64).unwrap_err();
        assert!(e.to_string().contains("4 to 64"), "{e}");
        assert!(!e.to_string().contains("12 "), "{e}");
        assert!(check_length("1234", Role::So, 4, 64).is_ok());
        assert!(check_length(&"9".repeat(65), Role::So, 4, 64).is_err());
        // A token that states no limits (0) accepts any length.
        assert!(check_length("1", Role::User, 0, 0).is_ok());
    }

    #[test]
    fn a_pin_line_is_read_from_the_descriptor_without_read_ahead() {
        // std's buffered stdin would swallow the following lines into its
        // own (never zeroized) buffer; reading the descriptor byte-wise
        // leaves them in the pipe.
        let (mut rx, mut tx) = std::io::pipe().unwrap();
        tx.write_all(b"1234\r\nnext-pin\n").unwrap();
        drop(tx);
        let pin = read_line_fd(rx.as_fd()).unwrap().unwrap();
        assert_eq!(pin.as_str(), "1234");
        let mut rest = String::new();
        rx.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "next-pin\n");
        assert!(read_line_fd(rx.as_fd()).unwrap().is_none(), "EOF is None");
    }

    #[test]
    fn files_are_read_and_missing_files_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("so"), "so-secret\n").unwrap();
        let mut r = PinReader {
            files: PinFiles {
                so: Some(dir.path().join("so")),
                user: Some(dir.path().join("missing")),
                new: None,
            },
            tty: false,
        };
        assert_eq!(r.current(Role::So, 4, 64).unwrap().as_str(), "so-secret");
        let e = r.current(Role::User, 4, 64).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert_eq!(e.exit_code(), 2);
        // Two lines are no PIN; a final CRLF is still fine.
        for (text, ok) in [
            ("so-secret\nso-secret\n", false),
            ("so-secret\n\n", false),
            ("so\rsecret", false),
            ("so-secret\r\n", true),
        ] {
            std::fs::write(dir.path().join("lines"), text).unwrap();
            let got = read_file(&dir.path().join("lines"));
            assert_eq!(got.is_ok(), ok, "{text:?}");
            if let Err(e) = got {
                assert_eq!(e.exit_code(), 2);
                assert!(e.to_string().contains("more than one line"), "{e}");
                assert!(!e.to_string().contains("secret"), "{e}");
            }
        }
        assert_eq!(readable_by_others(0o600), None);
        assert_eq!(readable_by_others(0o640), Some("its group"));
        assert_eq!(readable_by_others(0o604), Some("all users"));
        // Outside the token's limits: refused without being tried, and
        // without being shown.
        for (min, max) in [(10, 64), (4, 8)] {
            let e = r.current(Role::So, min, max).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("9 bytes long"), "{e}");
            assert!(!e.to_string().contains("so-secret"), "{e}");
        }
    }
}
