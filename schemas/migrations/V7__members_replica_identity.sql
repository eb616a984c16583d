-- V7: the replica identity of `members` is its Memberstack id.
--
-- CDC keys a member's events by `memberstack_id`, so that they share a Kafka partition with
-- the member's webhook events. Under REPLICA IDENTITY DEFAULT a hard delete's old row carries
-- only the primary key (`id`), and the delete event would have no key (a random partition,
-- out of order with the member's other events). `memberstack_id` is NOT NULL and UNIQUE, so its
-- unique index can be the replica identity: deletes (and updates that change it) then carry it.
alter table public.members replica identity using index members_memberstack_id_key;
