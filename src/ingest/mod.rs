pub mod event;
pub mod verify;
