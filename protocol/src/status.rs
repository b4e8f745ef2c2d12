//! The closed list of reply status codes.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Status of a reply. Encoded as an unsigned integer; a value this version
/// does not know decodes to [`Status::Unknown`] rather than failing the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Status {
    #[default]
    Ok,
    BadCrc,
    Malformed,
    UnknownDevice,
    NotRegistered,
    AuthFailed,
    Replayed,
    WrongService,
    RateLimited,
    Internal,
    Stale,
    TooLarge,
    AlreadyActive,
    UnsupportedVersion,
    Busy,
    Unknown(u8),
}

impl Status {
    pub const KNOWN: [Status; 15] = [
        Status::Ok,
        Status::BadCrc,
        Status::Malformed,
        Status::UnknownDevice,
        Status::NotRegistered,
        Status::AuthFailed,
        Status::Replayed,
        Status::WrongService,
        Status::RateLimited,
        Status::Internal,
        Status::Stale,
        Status::TooLarge,
        Status::AlreadyActive,
        Status::UnsupportedVersion,
        Status::Busy,
    ];

    pub fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::BadCrc => 1,
            Status::Malformed => 2,
            Status::UnknownDevice => 3,
            Status::NotRegistered => 4,
            Status::AuthFailed => 5,
            Status::Replayed => 6,
            Status::WrongService => 7,
            Status::RateLimited => 8,
            Status::Internal => 9,
            Status::Stale => 10,
            Status::TooLarge => 11,
            Status::AlreadyActive => 12,
            Status::UnsupportedVersion => 13,
            Status::Busy => 14,
            Status::Unknown(code) => code,
        }
    }

    pub fn from_code(code: u8) -> Status {
        Self::KNOWN
            .into_iter()
            .find(|s| s.code() == code)
            .unwrap_or(Status::Unknown(code))
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadCrc => "bad_crc",
            Status::Malformed => "malformed",
            Status::UnknownDevice => "unknown_device",
            Status::NotRegistered => "not_registered",
            Status::AuthFailed => "auth_failed",
            Status::Replayed => "replayed",
            Status::WrongService => "wrong_service",
            Status::RateLimited => "rate_limited",
            Status::Internal => "internal",
            Status::Stale => "stale",
            Status::TooLarge => "too_large",
            Status::AlreadyActive => "already_active",
            Status::UnsupportedVersion => "unsupported_version",
            Status::Busy => "busy",
            Status::Unknown(_) => "unknown",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.name(), self.code())
    }
}

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u8::deserialize(d).map(Status::from_code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_round_trip() {
        for s in Status::KNOWN {
            assert_eq!(Status::from_code(s.code()), s);
        }
        assert_eq!(Status::from_code(200), Status::Unknown(200));
    }
}
