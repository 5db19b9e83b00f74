//! The channels touchpoints deliver through, one file each: the wire format, signing, and what an
//! answer means for the batch; and the network guard every channel's requests pass. Nothing here
//! knows about plans or the queue.

pub mod custom;
pub mod net_guard;
