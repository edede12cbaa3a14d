
pub mod model;
pub mod policy_model;
pub mod packets;
pub mod netns;
pub mod client;
pub mod daemon;
pub mod ops;
pub mod xtask;
