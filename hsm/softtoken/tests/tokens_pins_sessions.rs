//! Library, slots, tokens, PINs, login state and sessions, and the
//! configuration file (docs/softtoken.md "Configuration", "Slots, tokens, PINs").

mod common;

use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use cryptoki::error::RvError;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{SessionState, UserType};

#[test]
fn library_slots_and_fresh_token_info() {
    let opts = ChildOpts {
        slots: 3,
        pin_min_len: 5,
        pin_max_len: 20,
        ..ChildOpts::default()
    };
    run_in_child_with("library_slots_and_fresh_token_info", &opts, || {
        let p = open();
        let info = p.get_library_info().expect("C_GetInfo");
        assert!(info.cryptoki_version().major() >= 2);

        // C_Initialize twice in one process.
        assert_rv(
            p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)),
            RvError::CryptokiAlreadyInitialized,
        );

        let all = p.get_all_slots().expect("C_GetSlotList");
        let ids: Vec<u64> = all.iter().map(|s| s.id()).collect();
        assert_eq!(ids, vec![0, 1, 2], "slots = 3 gives IDs 0..3");
        let with_token = p.get_slots_with_token().expect("C_GetSlotList(TRUE)");
        assert_eq!(with_token.len(), 3, "every slot always holds a token");
        assert!(
            p.get_slots_with_initialized_token()
                .expect("list")
                .is_empty()
        );

        for slot in &all {
            let si = p.get_slot_info(*slot).expect("C_GetSlotInfo");
            assert!(
                si.token_present(),
                "CKF_TOKEN_PRESENT on slot {}",
                slot.id()
            );
            let ti = p.get_token_info(*slot).expect("C_GetTokenInfo");
            assert!(ti.rng(), "CKF_RNG");
            assert!(ti.login_required(), "CKF_LOGIN_REQUIRED");
            assert!(!ti.token_initialized(), "fresh token is not initialised");
            assert!(!ti.user_pin_initialized());
            assert!(!ti.user_pin_locked() && !ti.so_pin_locked());
            assert_eq!(ti.min_pin_length(), 5, "ulMinPinLen from pin_min_len");
            assert_eq!(ti.max_pin_length(), 20, "ulMaxPinLen from pin_max_len");
        }

        // A slot ID that does not exist.
        let bogus = cryptoki::slot::Slot::try_from(3u64).expect("slot");
        assert_rv(p.get_slot_info(bogus), RvError::SlotIdInvalid);
        assert_rv(p.get_token_info(bogus), RvError::SlotIdInvalid);

        // C_Finalize, then a clone of the context sees CKR_CRYPTOKI_NOT_INITIALIZED.
        let p2 = p.clone();
        p.finalize().expect("C_Finalize");
        assert_rv(p2.get_all_slots(), RvError::CryptokiNotInitialized);
    });
}

#[test]
fn init_token_and_reinit() {
    run_in_child("init_token_and_reinit", || {
        let p = open();
        let slot = slot0(&p);

        // PIN length limits (min 4, max 32 in the child's config).
        assert_rv(p.init_token(slot, &pin("abc"), "x"), RvError::PinLenRange);
        assert_rv(
            p.init_token(slot, &pin(&"a".repeat(33)), "x"),
            RvError::PinLenRange,
        );

        p.init_token(slot, &pin(SO_PIN), TOKEN_LABEL)
            .expect("C_InitToken");
        let ti = p.get_token_info(slot).expect("token info");
        assert!(ti.token_initialized(), "CKF_TOKEN_INITIALIZED");
        assert!(!ti.user_pin_initialized(), "no user PIN yet");
        assert_eq!(ti.label(), TOKEN_LABEL);
        // Slot 1 is untouched.
        let other = p.get_all_slots().expect("slots")[1];
        assert!(!p.get_token_info(other).expect("info").token_initialized());

        // User login before InitPIN.
        let s = p.open_rw_session(slot).expect("session");
        assert_rv(
            s.login(UserType::User, Some(&pin(USER_PIN))),
            RvError::UserPinNotInitialized,
        );
        // InitToken while a session is open: CKR_SESSION_EXISTS (PKCS#11 C_InitToken).
        assert_rv(
            p.init_token(slot, &pin(SO_PIN), "again"),
            RvError::SessionExists,
        );
        s.login(UserType::So, Some(&pin(SO_PIN))).expect("SO login");
        s.init_pin(&pin(USER_PIN)).expect("C_InitPIN");
        s.logout().expect("logout");
        drop(s);
        assert!(p.get_token_info(slot).expect("info").user_pin_initialized());

        // Put an object on the token, then re-initialise.
        let s = user_session(&p, slot);
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"doomed".to_vec()),
            Attribute::Value(b"v".to_vec()),
        ])
        .expect("create data object");
        drop(s);

        // Re-initialising needs the current SO PIN.
        assert_rv(
            p.init_token(slot, &pin("wrong-so-pin"), "renamed"),
            RvError::PinIncorrect,
        );
        p.init_token(slot, &pin(SO_PIN), "renamed")
            .expect("re-init with SO PIN");
        let ti = p.get_token_info(slot).expect("info");
        assert_eq!(ti.label(), "renamed");
        assert!(!ti.user_pin_initialized(), "re-init clears the user PIN");
        let s = p.open_rw_session(slot).expect("session");
        assert!(
            s.find_objects(&[Attribute::Label(b"doomed".to_vec())])
                .expect("find")
                .is_empty(),
            "re-initialising destroys the token's objects"
        );
    });
}

#[test]
fn login_logout_states_and_session_rules() {
    run_in_child("login_logout_states_and_session_rules", || {
        let (p, slot) = setup();

        let ro = p.open_ro_session(slot).expect("R/O session");
        let info = ro.get_session_info().expect("C_GetSessionInfo");
        assert!(!info.read_write());
        assert_eq!(info.slot_id().id(), slot.id());
        assert!(matches!(info.session_state(), SessionState::RoPublic));

        let rw = p.open_rw_session(slot).expect("R/W session");
        assert!(rw.get_session_info().expect("info").read_write());
        assert!(matches!(
            rw.get_session_info().expect("info").session_state(),
            SessionState::RwPublic
        ));

        // Logout when nobody is logged in.
        assert_rv(rw.logout(), RvError::UserNotLoggedIn);
        // SO login while a R/O session exists.
        assert_rv(
            rw.login(UserType::So, Some(&pin(SO_PIN))),
            RvError::SessionReadOnlyExists,
        );

        // User login applies to every session of the application.
        ro.login(UserType::User, Some(&pin(USER_PIN)))
            .expect("user login");
        assert!(matches!(
            ro.get_session_info().expect("info").session_state(),
            SessionState::RoUser
        ));
        assert!(matches!(
            rw.get_session_info().expect("info").session_state(),
            SessionState::RwUser
        ));
        assert_rv(
            rw.login(UserType::User, Some(&pin(USER_PIN))),
            RvError::UserAlreadyLoggedIn,
        );
        // InitPIN is an SO function.
        assert_rv(rw.init_pin(&pin("new-user-pin")), RvError::UserNotLoggedIn);
        // SetPIN in a R/O session.
        assert_rv(
            ro.set_pin(&pin(USER_PIN), &pin("new-user-pin")),
            RvError::SessionReadOnly,
        );
        // A R/O session may not create token objects, even when logged in.
        assert_rv(
            ro.create_object(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Value(b"x".to_vec()),
            ]),
            RvError::SessionReadOnly,
        );
        // ... but session objects are fine.
        ro.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(false),
            Attribute::Value(b"x".to_vec()),
        ])
        .expect("session object in R/O session");

        ro.logout().expect("logout");
        assert!(matches!(
            rw.get_session_info().expect("info").session_state(),
            SessionState::RwPublic
        ));
        drop(ro);

        // With only R/W sessions left: SO login while the user is logged in.
        rw.login(UserType::User, Some(&pin(USER_PIN)))
            .expect("login");
        assert_rv(
            rw.login(UserType::So, Some(&pin(SO_PIN))),
            RvError::UserAnotherAlreadyLoggedIn,
        );
        rw.logout().expect("logout");

        // SO: only R/W sessions.
        rw.login(UserType::So, Some(&pin(SO_PIN)))
            .expect("SO login");
        assert!(matches!(
            rw.get_session_info().expect("info").session_state(),
            SessionState::RwSecurityOfficer
        ));
        assert_rv(p.open_ro_session(slot), RvError::SessionReadWriteSoExists);
        let rw2 = p
            .open_rw_session(slot)
            .expect("second R/W session under SO");
        assert!(matches!(
            rw2.get_session_info().expect("info").session_state(),
            SessionState::RwSecurityOfficer
        ));
        rw.logout().expect("SO logout");

        // Closing every session logs the user out (PKCS#11: C_CloseAllSessions /
        // last session closed).
        rw.login(UserType::User, Some(&pin(USER_PIN)))
            .expect("login");
        drop(rw);
        drop(rw2);
        let s = p.open_ro_session(slot).expect("session");
        assert!(
            matches!(
                s.get_session_info().expect("info").session_state(),
                SessionState::RoPublic
            ),
            "closing the last session logs the user out"
        );
    });
}

#[test]
fn set_pin_and_pin_length_limits() {
    run_in_child("set_pin_and_pin_length_limits", || {
        let (p, slot) = setup();
        let s = p.open_rw_session(slot).expect("session");

        // InitPIN length limits.
        s.login(UserType::So, Some(&pin(SO_PIN))).expect("SO login");
        assert_rv(s.init_pin(&pin("123")), RvError::PinLenRange);
        assert_rv(s.init_pin(&pin(&"9".repeat(33))), RvError::PinLenRange);
        // Exactly the limits are accepted.
        s.init_pin(&pin("1234")).expect("4-byte PIN");
        s.init_pin(&pin(&"7".repeat(32))).expect("32-byte PIN");
        s.init_pin(&pin(USER_PIN)).expect("back to USER_PIN");
        // SO changes its own PIN.
        assert_rv(
            s.set_pin(&pin("not-the-so-pin"), &pin("new-so-pin")),
            RvError::PinIncorrect,
        );
        assert_rv(s.set_pin(&pin(SO_PIN), &pin("so")), RvError::PinLenRange);
        s.set_pin(&pin(SO_PIN), &pin("new-so-pin"))
            .expect("SO SetPIN");
        s.logout().expect("logout");
        assert_rv(
            s.login(UserType::So, Some(&pin(SO_PIN))),
            RvError::PinIncorrect,
        );
        s.login(UserType::So, Some(&pin("new-so-pin")))
            .expect("new SO PIN");
        s.logout().expect("logout");

        // User changes its PIN.
        s.login(UserType::User, Some(&pin(USER_PIN)))
            .expect("login");
        assert_rv(
            s.set_pin(&pin("wrong-old"), &pin("new-user-pin")),
            RvError::PinIncorrect,
        );
        assert_rv(s.set_pin(&pin(USER_PIN), &pin("abc")), RvError::PinLenRange);
        assert_rv(
            s.set_pin(&pin(USER_PIN), &pin(&"x".repeat(33))),
            RvError::PinLenRange,
        );
        s.set_pin(&pin(USER_PIN), &pin("new-user-pin"))
            .expect("user SetPIN");
        s.logout().expect("logout");
        assert_rv(
            s.login(UserType::User, Some(&pin(USER_PIN))),
            RvError::PinIncorrect,
        );
        s.login(UserType::User, Some(&pin("new-user-pin")))
            .expect("login with the new PIN");
        // Login PIN length out of range.
        s.logout().expect("logout");
        assert_rv_in(
            s.login(UserType::User, Some(&pin("ab"))),
            // PKCS#11 lists CKR_PIN_LEN_RANGE only for C_InitPIN/C_SetPIN/C_InitToken;
            // C_Login may answer CKR_PIN_INCORRECT for an impossible PIN.
            &[RvError::PinIncorrect, RvError::PinLenRange],
        );
    });
}

#[test]
fn user_pin_lockout_and_unlock_by_so() {
    // max_login_failures = 3 in the child's config.
    run_in_child("user_pin_lockout_and_unlock_by_so", || {
        let (p, slot) = setup();
        let s = p.open_rw_session(slot).expect("session");
        let flags = |p: &cryptoki::context::Pkcs11| p.get_token_info(slot).expect("info");

        let ti = flags(&p);
        assert!(!ti.user_pin_count_low() && !ti.user_pin_final_try() && !ti.user_pin_locked());

        // A success resets the counter.
        assert_rv(
            s.login(UserType::User, Some(&pin("wrong-1"))),
            RvError::PinIncorrect,
        );
        assert!(
            flags(&p).user_pin_count_low(),
            "COUNT_LOW after one failure"
        );
        s.login(UserType::User, Some(&pin(USER_PIN)))
            .expect("login");
        s.logout().expect("logout");
        let ti = flags(&p);
        assert!(
            !ti.user_pin_count_low(),
            "a successful login clears COUNT_LOW"
        );

        assert_rv(
            s.login(UserType::User, Some(&pin("wrong-1"))),
            RvError::PinIncorrect,
        );
        let ti = flags(&p);
        assert!(ti.user_pin_count_low() && !ti.user_pin_final_try() && !ti.user_pin_locked());
        assert_rv(
            s.login(UserType::User, Some(&pin("wrong-2"))),
            RvError::PinIncorrect,
        );
        let ti = flags(&p);
        assert!(ti.user_pin_final_try(), "FINAL_TRY after max-1 failures");
        assert!(!ti.user_pin_locked());
        // The last failure locks the PIN; it answers CKR_PIN_INCORRECT or CKR_PIN_LOCKED.
        assert_rv_in(
            s.login(UserType::User, Some(&pin("wrong-3"))),
            &[RvError::PinIncorrect, RvError::PinLocked],
        );
        let ti = flags(&p);
        assert!(
            ti.user_pin_locked(),
            "CKF_USER_PIN_LOCKED after max failures"
        );
        // Even the right PIN is refused now.
        assert_rv(
            s.login(UserType::User, Some(&pin(USER_PIN))),
            RvError::PinLocked,
        );
        // The SO PIN is unaffected.
        assert!(!ti.so_pin_locked() && !ti.so_pin_count_low());

        // SO re-initialises the user PIN: unlocked.
        s.login(UserType::So, Some(&pin(SO_PIN))).expect("SO login");
        s.init_pin(&pin("fresh-user-pin")).expect("C_InitPIN");
        s.logout().expect("logout");
        let ti = flags(&p);
        assert!(!ti.user_pin_locked() && !ti.user_pin_count_low() && !ti.user_pin_final_try());
        s.login(UserType::User, Some(&pin("fresh-user-pin")))
            .expect("login after unlock");
    });
}

#[test]
fn so_pin_lockout() {
    run_in_child("so_pin_lockout", || {
        let (p, slot) = setup();
        let s = p.open_rw_session(slot).expect("session");
        assert_rv(
            s.login(UserType::So, Some(&pin("bad-so-1"))),
            RvError::PinIncorrect,
        );
        assert!(p.get_token_info(slot).expect("info").so_pin_count_low());
        assert_rv(
            s.login(UserType::So, Some(&pin("bad-so-2"))),
            RvError::PinIncorrect,
        );
        assert!(p.get_token_info(slot).expect("info").so_pin_final_try());
        assert_rv_in(
            s.login(UserType::So, Some(&pin("bad-so-3"))),
            &[RvError::PinIncorrect, RvError::PinLocked],
        );
        let ti = p.get_token_info(slot).expect("info");
        assert!(ti.so_pin_locked(), "CKF_SO_PIN_LOCKED");
        assert!(!ti.user_pin_locked(), "user PIN unaffected");
        assert_rv(
            s.login(UserType::So, Some(&pin(SO_PIN))),
            RvError::PinLocked,
        );
        // The user can still log in.
        s.login(UserType::User, Some(&pin(USER_PIN)))
            .expect("user login");
        s.logout().expect("logout");
        drop(s);
        // Re-initialising with the locked SO PIN is refused.
        assert_rv(
            p.init_token(slot, &pin(SO_PIN), "again"),
            RvError::PinLocked,
        );
    });
}

#[test]
fn pin_state_persists_across_reload() {
    run_in_child("pin_state_persists_across_reload", || {
        let (p, slot) = setup();
        let s = p.open_rw_session(slot).expect("session");
        s.login(UserType::User, Some(&pin(USER_PIN)))
            .expect("login");
        s.set_pin(&pin(USER_PIN), &pin("changed-pin"))
            .expect("SetPIN");
        s.logout().expect("logout");
        assert_rv(
            s.login(UserType::User, Some(&pin("nope-1"))),
            RvError::PinIncorrect,
        );
        drop(s);
        p.finalize().expect("C_Finalize");

        let p = open();
        let ti = p.get_token_info(slot).expect("info");
        assert!(ti.token_initialized() && ti.user_pin_initialized());
        assert_eq!(ti.label(), TOKEN_LABEL);
        assert!(ti.user_pin_count_low(), "failure count survives a reload");
        let s = p.open_rw_session(slot).expect("session");
        assert_rv(
            s.login(UserType::User, Some(&pin(USER_PIN))),
            RvError::PinIncorrect,
        );
        s.login(UserType::User, Some(&pin("changed-pin")))
            .expect("new PIN after reload");
    });
}

#[test]
fn config_unknown_key_fails_initialize() {
    let opts = ChildOpts {
        raw_conf: Some("slots = 1\nbogus_key = 3\nkdf_iterations = 1000\n".into()),
        ..ChildOpts::default()
    };
    let out = run_in_child_with("config_unknown_key_fails_initialize", &opts, || {
        let p = load();
        assert_rv(
            p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)),
            RvError::GeneralError,
        );
    });
    if let Some(out) = out {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("bogus_key"),
            "stderr should say what is wrong (the unknown key):\n{err}"
        );
    }
}

#[test]
fn config_invalid_values_fail_initialize() {
    for (name, conf) in [
        ("kdf", "slots = 1\nkdf_iterations = 999\n"),
        ("slots0", "slots = 0\nkdf_iterations = 1000\n"),
        ("slots65", "slots = 65\nkdf_iterations = 1000\n"),
        (
            "pinlen",
            "pin_min_len = 10\npin_max_len = 8\nkdf_iterations = 1000\n",
        ),
        ("syntax", "slots = = 1\n"),
        ("pinmax", "pin_max_len = 256\nkdf_iterations = 1000\n"),
        ("pinmin0", "pin_min_len = 0\nkdf_iterations = 1000\n"),
        (
            "failures0",
            "max_login_failures = 0\nkdf_iterations = 1000\n",
        ),
        (
            "failures101",
            "max_login_failures = 101\nkdf_iterations = 1000\n",
        ),
        ("type", "slots = \"two\"\nkdf_iterations = 1000\n"),
    ] {
        let opts = ChildOpts {
            raw_conf: Some(conf.into()),
            ..ChildOpts::default()
        };
        let out = run_in_child_with("config_invalid_values_fail_initialize", &opts, || {
            let p = load();
            assert_rv(
                p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)),
                RvError::GeneralError,
            );
        });
        match out {
            // In the child the body ran once; stop looping.
            None => return,
            Some(out) => {
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!err.trim().is_empty(), "case {name}: no message on stderr");
            }
        }
    }
}

#[test]
fn config_missing_named_file_fails_initialize() {
    let opts = ChildOpts {
        missing_conf: true,
        ..ChildOpts::default()
    };
    let out = run_in_child_with("config_missing_named_file_fails_initialize", &opts, || {
        let p = load();
        assert_rv(
            p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)),
            RvError::GeneralError,
        );
    });
    if let Some(out) = out {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("does-not-exist.toml"),
            "stderr should name the missing file:\n{err}"
        );
    }
}
