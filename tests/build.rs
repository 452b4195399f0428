//! svs-bench measures the soft token in-process through svs-hsm
//! (`Pkcs11::new_from_self`), and end-to-end tests read keys from an
//! installation's token the same way (`Install::open_token`): both need the
//! token's PKCS#11 entry points in the executable's dynamic symbol table.

fn main() {
    for symbol in ["C_GetFunctionList", "C_GetInterfaceList", "C_GetInterface"] {
        println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol={symbol}");
        println!("cargo:rustc-link-arg-tests=-Wl,--export-dynamic-symbol={symbol}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
