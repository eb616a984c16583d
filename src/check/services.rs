//! The external services merge writes to, when configured: one read-only call each, so a
//! wrong URL or key shows up before the first change fails.

use super::Item;
use crate::config::Config;
use crate::sinks::memberstack::MemberstackClient;
use crate::sinks::supabase_auth::SupabaseAuthClient;

pub(super) async fn check(config: &Config) -> Vec<Item> {
    let mut items = Vec::new();
    if config.memberstack.api_key.is_none() {
        items.push(Item::pass(
            "memberstack api",
            "not configured (memberstack.api_key unset): merge writes Supabase only",
        ));
    } else {
        let hint = "fix memberstack.api_url / memberstack.api_key (Memberstack dashboard → DevTools → API keys)";
        let label = "memberstack api";
        items.push(match MemberstackClient::new(&config.memberstack, None) {
            Err(e) => Item::fail(label, e.to_string(), hint),
            Ok(client) => match client.list_members(None, 1, false).await {
                Ok(page) => Item::pass(
                    label,
                    format!(
                        "{} reachable, key accepted ({} members)",
                        config.memberstack.api_url, page.total_count
                    ),
                ),
                Err(e) => Item::fail(label, e.to_string(), hint),
            },
        });
    }
    if let Some(url) = &config.supabase.url {
        let hint = "fix supabase.url / supabase.service_role_key (project settings → API)";
        let label = "supabase auth admin api";
        items.push(match SupabaseAuthClient::new(&config.supabase) {
            Err(e) => Item::fail(label, e.to_string(), hint),
            // A random id: a 404 ("no such user") proves the URL and the key.
            Ok(client) => match client.get_user(uuid::Uuid::new_v4()).await {
                Ok(_) => Item::pass(label, format!("{url} reachable, key accepted")),
                Err(e) => Item::fail(label, e.to_string(), hint),
            },
        });
    }
    items
}
