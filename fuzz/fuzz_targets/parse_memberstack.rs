#![no_main]

use libfuzzer_sys::fuzz_target;
use membersync_fuzz::event::{MemberstackEventKind, parse_memberstack};

fuzz_target!(|body: &[u8]| {
    if let Ok(event) = parse_memberstack(body) {
        // What the parser promises about a success.
        assert!(!event.member_id.is_empty());
        assert!(!event.event.is_empty());
        assert_eq!(
            event.kind,
            MemberstackEventKind::from_event_name(&event.event)
        );
        assert!(event.raw.is_object());
    }
});
