//! Fault injection (docs/softtoken.md "Fault injection"): rules from
//! SVS_SOFTTOKEN_FAULTS, from the config key `faults`, and from
//! SVS_SOFTTOKEN_FAULTS_FILE changed while the module runs.
//!
//! Note: cryptoki's `Session::sign` calls C_Sign twice (length, then data), so
//! counting triggers are put on C_SignInit (once per signature) or on
//! C_GenerateRandom (once per call).

mod common;

use std::time::{Duration, Instant};

use common::*;
use cryptoki::error::RvError;
use cryptoki::session::{SessionState, UserType};

fn env_faults(spec: &str) -> ChildOpts {
    ChildOpts {
        env_faults: Some(spec.into()),
        ..ChildOpts::default()
    }
}

fn file_faults() -> ChildOpts {
    ChildOpts {
        faults_file: true,
        ..ChildOpts::default()
    }
}

#[test]
fn env_device_error_hits_only_its_function() {
    run_in_child_with(
        "env_device_error_hits_only_its_function",
        &env_faults("C_Sign:device_error"),
        || {
            let (p, slot) = setup();
            let s = user_session(&p, slot);
            let kp = gen_keypair(&s, true, "k");
            let msg = b"m";
            assert_rv(
                s.sign(&mech(CKM_SM3_SM2_Z_DER), kp.private, msg),
                RvError::DeviceError,
            );
            // C_SignUpdate, C_SignFinal are other functions. (Whether the failed
            // C_Sign ended the operation is checked by
            // injected_error_terminates_the_operation; use a new session here.)
            let s = p.open_rw_session(slot).expect("session");
            s.sign_init(&mech(CKM_SM3_SM2_Z_DER), kp.private)
                .expect("init");
            s.sign_update(msg).expect("update");
            let sig = s.sign_final().expect("C_SignFinal is not C_Sign");
            s.verify(&mech(CKM_SM3_SM2_Z_DER), kp.public, msg, &sig)
                .expect("C_Verify unaffected");
        },
    );
}

#[test]
fn env_after_and_count_triggers() {
    run_in_child_with(
        "env_after_and_count_triggers",
        &env_faults("C_SignInit:device_error:after=2,count=3"),
        || {
            let (p, slot) = setup();
            let s = user_session(&p, slot);
            let kp = gen_keypair(&s, false, "k");
            let mut outcome = Vec::new();
            for i in 0..8 {
                let r = s.sign(&mech(CKM_SM3_SM2_Z), kp.private, format!("{i}").as_bytes());
                match r {
                    Ok(sig) => {
                        assert!(sm2_verify_prehash(
                            &kp.point,
                            &e_value(DEFAULT_ID, &kp.point, format!("{i}").as_bytes()),
                            &sig
                        ));
                        outcome.push(true);
                    }
                    Err(e) => {
                        assert_rv::<()>(Err(e), RvError::DeviceError);
                        outcome.push(false);
                    }
                }
            }
            assert_eq!(
                outcome,
                vec![true, true, false, false, false, true, true, true],
                "after=2 lets two through, count=3 fires three times then the rule is spent"
            );
        },
    );
}

#[test]
fn env_rate_trigger() {
    run_in_child_with(
        "env_rate_trigger",
        &env_faults("C_GenerateRandom:general_error:rate=0.5;C_DigestInit:rv=0x21:rate=0"),
        || {
            let (p, slot) = setup();
            let s = p.open_ro_session(slot).expect("session");
            let mut failed = 0;
            for _ in 0..400 {
                match s.generate_random_vec(8) {
                    Ok(v) => assert_eq!(v.len(), 8),
                    Err(e) => {
                        assert_rv::<()>(Err(e), RvError::GeneralError);
                        failed += 1;
                    }
                }
            }
            // Binomial(400, 0.5): outside 120..280 has probability < 1e-15.
            assert!(
                (120..=280).contains(&failed),
                "rate=0.5 fired {failed} of 400 times"
            );
            // rate=0 never fires.
            for _ in 0..50 {
                s.digest(&mech(CKM_SM3), b"abc")
                    .expect("rate=0 never fires");
            }
        },
    );
}

#[test]
fn wildcard_rule_from_file() {
    run_in_child_with("wildcard_rule_from_file", &file_faults(), || {
        let (p, slot) = setup();
        let s = p.open_ro_session(slot).expect("session");
        // "*" matches every call but C_Initialize/C_Finalize/C_Get*FunctionList/
        // C_GetInterface*; after=2 lets the next two calls through.
        set_faults_file("*:device_removed:after=2,count=1");
        s.generate_random_vec(4).expect("first call passes");
        s.digest(&mech(CKM_SM3), b"abc")
            .expect_err("C_DigestInit is the third call");
        s.generate_random_vec(4).expect("count=1 spent");
    });
}

#[test]
fn env_rv_and_session_handle_invalid_actions() {
    run_in_child_with(
        "env_rv_and_session_handle_invalid_actions",
        &env_faults(
            "C_GenerateRandom:rv=0x21:count=1;C_DigestInit:session_handle_invalid:count=1;\
             C_FindObjectsInit:general_error:count=1",
        ),
        || {
            let (p, slot) = setup();
            let s = p.open_ro_session(slot).expect("session");
            assert_rv(s.generate_random_vec(4), RvError::DataLenRange);
            s.generate_random_vec(4).expect("spent");
            assert_rv(
                s.digest(&mech(CKM_SM3), b"abc"),
                RvError::SessionHandleInvalid,
            );
            assert_eq!(
                s.digest(&mech(CKM_SM3), b"abc").expect("spent").as_slice(),
                sm3(b"abc")
            );
            assert_rv(s.find_objects(&[]), RvError::GeneralError);
            s.find_objects(&[]).expect("spent");
        },
    );
}

#[test]
fn env_stall_delays_then_proceeds() {
    run_in_child_with(
        "env_stall_delays_then_proceeds",
        &env_faults("C_GenerateRandom:stall=400:count=1"),
        || {
            let (p, slot) = setup();
            let s = p.open_ro_session(slot).expect("session");
            let t = Instant::now();
            let v = s
                .generate_random_vec(16)
                .expect("a stall lets the call proceed");
            let stalled = t.elapsed();
            assert_eq!(v.len(), 16);
            assert!(
                stalled >= Duration::from_millis(400),
                "stalled only {stalled:?}"
            );
            let t = Instant::now();
            s.generate_random_vec(16).expect("second call");
            let normal = t.elapsed();
            assert!(
                normal < Duration::from_millis(300),
                "count=1 spent, took {normal:?}"
            );
        },
    );
}

#[test]
fn config_key_faults() {
    let opts = ChildOpts {
        conf_faults: Some("C_DigestInit:device_error:count=2".into()),
        ..ChildOpts::default()
    };
    run_in_child_with("config_key_faults", &opts, || {
        let (p, slot) = setup();
        let s = p.open_ro_session(slot).expect("session");
        assert_rv(s.digest(&mech(CKM_SM3), b"abc"), RvError::DeviceError);
        assert_rv(s.digest(&mech(CKM_SM3), b"abc"), RvError::DeviceError);
        s.digest(&mech(CKM_SM3), b"abc").expect("count=2 spent");
    });
}

#[test]
fn faults_file_changed_at_run_time() {
    run_in_child_with("faults_file_changed_at_run_time", &file_faults(), || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, false, "k");
        let sign = || s.sign(&mech(CKM_SM3_SM2_Z_DER), kp.private, b"m");
        sign().expect("no faults yet");

        set_faults_file("C_SignInit:device_error");
        assert_rv(sign(), RvError::DeviceError);
        assert_rv(sign(), RvError::DeviceError);
        s.generate_random_vec(4)
            .expect("other functions unaffected");

        set_faults_file("C_SignInit:general_error:count=1");
        assert_rv(sign(), RvError::GeneralError);
        sign().expect("count=1 spent, old rule gone");

        set_faults_file("C_GenerateRandom:stall=300:count=1");
        let t = Instant::now();
        s.generate_random_vec(4).expect("stall proceeds");
        assert!(t.elapsed() >= Duration::from_millis(300));

        set_faults_file("");
        for _ in 0..3 {
            sign().expect("faults cleared");
        }
    });
}

#[test]
fn token_not_present_then_back() {
    run_in_child_with("token_not_present_then_back", &file_faults(), || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        let kp = gen_keypair(&s, true, "survivor");
        let other = p.open_ro_session(slot).expect("second session");

        set_faults_file("*:token_not_present:count=2");
        // First firing: the token is pulled.
        assert_rv(s.generate_random_vec(4), RvError::TokenNotPresent);
        // Second firing.
        assert_rv(p.get_token_info(slot), RvError::TokenNotPresent);
        // The rule is spent: the token is back.
        let ti = p
            .get_token_info(slot)
            .expect("token info once the rule is spent");
        assert!(ti.token_initialized() && ti.user_pin_initialized());
        let si = p.get_slot_info(slot).expect("slot info");
        assert!(si.token_present(), "the token is back");
        // Every session was closed by the pull.
        assert_rv_in(
            s.generate_random_vec(4),
            &[RvError::SessionHandleInvalid, RvError::SessionClosed],
        );
        assert_rv_in(
            other.get_session_info(),
            &[RvError::SessionHandleInvalid, RvError::SessionClosed],
        );
        // New session: the user was logged out and must log in again.
        let s2 = p.open_rw_session(slot).expect("reopen");
        assert!(matches!(
            s2.get_session_info().expect("info").session_state(),
            SessionState::RwPublic
        ));
        s2.login(UserType::User, Some(&pin(USER_PIN)))
            .expect("login again");
        // The token object survived; sign with it.
        let privk = find_one(
            &s2,
            &[
                cryptoki::object::Attribute::Class(cryptoki::object::ObjectClass::PRIVATE_KEY),
                cryptoki::object::Attribute::Label(b"survivor".to_vec()),
            ],
        );
        let sig = s2.sign(&mech(CKM_SM3_SM2_Z), privk, b"back").expect("sign");
        assert!(sm2_verify_prehash(
            &kp.point,
            &e_value(DEFAULT_ID, &kp.point, b"back"),
            &sig
        ));
    });
}

#[test]
fn env_token_not_present_on_one_function() {
    run_in_child_with(
        "env_token_not_present_on_one_function",
        &env_faults("C_GenerateRandom:token_not_present:after=1,count=1"),
        || {
            let (p, slot) = setup();
            let s = user_session(&p, slot);
            s.generate_random_vec(4)
                .expect("after=1 lets the first through");
            assert_rv(s.generate_random_vec(4), RvError::TokenNotPresent);
            // Spent: token back, but the session is gone and the user logged out.
            assert_rv_in(
                s.generate_random_vec(4),
                &[RvError::SessionHandleInvalid, RvError::SessionClosed],
            );
            let s2 = p.open_ro_session(slot).expect("reopen");
            assert!(matches!(
                s2.get_session_info().expect("info").session_state(),
                SessionState::RoPublic
            ));
            s2.generate_random_vec(4).expect("works again");
        },
    );
}

#[test]
fn slot_reports_no_token_while_pulled() {
    run_in_child_with("slot_reports_no_token_while_pulled", &file_faults(), || {
        let (p, slot) = setup();
        let s = user_session(&p, slot);
        set_faults_file("C_GetSlotInfo:token_not_present:count=1");
        // The firing call itself: an error, or CKF_TOKEN_PRESENT cleared.
        match p.get_slot_info(slot) {
            Ok(si) => assert!(!si.token_present(), "slot must not report a token"),
            Err(e) => assert_rv::<()>(Err(e), RvError::TokenNotPresent),
        }
        // Sessions are gone; the rule is spent, so the token is back.
        assert_rv_in(
            s.generate_random_vec(4),
            &[RvError::SessionHandleInvalid, RvError::SessionClosed],
        );
        assert!(p.get_slot_info(slot).expect("slot info").token_present());
    });
}

/// docs/softtoken.md: "*" = every call but C_Initialize/C_Finalize/
/// C_Get*FunctionList/C_GetInterface*. A monitor that polls C_GetSlotInfo
/// must therefore see the token come back once the rule is spent.
#[test]
fn token_comes_back_when_only_slot_info_is_polled() {
    run_in_child_with(
        "token_comes_back_when_only_slot_info_is_polled",
        &file_faults(),
        || {
            let (p, slot) = setup();
            let s = p.open_ro_session(slot).expect("session");
            set_faults_file("*:token_not_present:count=2");
            assert_rv(s.generate_random_vec(4), RvError::TokenNotPresent);
            let mut polls = Vec::new();
            for _ in 0..5 {
                polls.push(matches!(p.get_slot_info(slot), Ok(si) if si.token_present()));
            }
            assert!(
                polls.contains(&true),
                "C_GetSlotInfo never reports the token back after count=2 (polls: {polls:?})"
            );
        },
    );
}

/// docs/softtoken.md: C_GetInfo, C_GetSlotList and C_GetSlotInfo are not
/// among the calls "*" leaves out.
#[test]
fn wildcard_covers_info_and_slot_calls() {
    run_in_child_with(
        "wildcard_covers_info_and_slot_calls",
        &file_faults(),
        || {
            let (p, slot) = setup();
            set_faults_file("*:device_error:count=3");
            assert_rv(p.get_library_info(), RvError::DeviceError);
            assert_rv(p.get_all_slots(), RvError::DeviceError);
            assert_rv(p.get_slot_info(slot), RvError::DeviceError);
            p.get_slot_info(slot).expect("count=3 spent");
        },
    );
}

/// PKCS#11 C_Sign: "A call to C_Sign always terminates the active signing
/// operation unless it returns CKR_BUFFER_TOO_SMALL or is a successful call
/// to determine the length". An injected error must leave the session as a
/// real token's error would: with no active operation.
#[test]
fn injected_error_terminates_the_operation() {
    run_in_child_with(
        "injected_error_terminates_the_operation",
        &env_faults("C_Sign:device_error:count=1;C_SignFinal:device_error:count=1"),
        || {
            let (p, slot) = setup();
            let s = user_session(&p, slot);
            let kp = gen_keypair(&s, false, "k");
            let m = mech(CKM_SM3_SM2_Z_DER);
            assert_rv(s.sign(&m, kp.private, b"m"), RvError::DeviceError);
            // A retry (C_SignInit again) works: the failed C_Sign ended the operation.
            s.sign(&m, kp.private, b"m")
                .expect("retry after an injected C_Sign error");
            s.sign_init(&m, kp.private).expect("init");
            s.sign_update(b"m").expect("update");
            assert_rv(s.sign_final(), RvError::DeviceError);
            s.sign_init(&m, kp.private)
                .expect("init after an injected C_SignFinal error");
        },
    );
}
