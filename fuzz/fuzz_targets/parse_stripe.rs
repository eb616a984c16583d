#![no_main]

use libfuzzer_sys::fuzz_target;
use membersync_fuzz::event::parse_stripe;

fuzz_target!(|body: &[u8]| {
    if let Ok(event) = parse_stripe(body) {
        assert!(event.id.starts_with("evt_"));
        assert!(event.object.is_object());
        let _ = event.subscription();
        if let Some(key) = event.routing_key() {
            assert!(!key.key.is_empty());
        }
    }
});
