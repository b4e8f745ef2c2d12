//! The front door's DER reader, on any certificate a client presents: the
//! names, serial and validity it reads decode or are refused.
#![no_main]

use fleet_broker::frontdoor::der;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = der::names(data);
    let _ = der::validity(data);
});
