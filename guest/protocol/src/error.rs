//! Status codes, shared by both sides so an error means the same thing everywhere.

use prost::Message;

/// gRPC status codes (the subset the agent uses, with the standard numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Code {
    /// Success.
    Ok = 0,
    /// The request was cancelled.
    Cancelled = 1,
    /// An error that fits nowhere else.
    Unknown = 2,
    /// The request is malformed or names something invalid.
    InvalidArgument = 3,
    /// The deadline passed.
    DeadlineExceeded = 4,
    /// The container or process does not exist.
    NotFound = 5,
    /// The container or process exists already.
    AlreadyExists = 6,
    /// Refused.
    PermissionDenied = 7,
    /// Too many requests in flight, or a frame too large.
    ResourceExhausted = 8,
    /// The object is in the wrong state for this request.
    FailedPrecondition = 9,
    /// The method does not exist.
    Unimplemented = 12,
    /// The agent failed doing something it should have been able to do.
    Internal = 13,
    /// The agent is going away.
    Unavailable = 14,
}

impl Code {
    /// The code for a number off the wire (unknown numbers become `Unknown`).
    pub fn from_i32(v: i32) -> Code {
        match v {
            0 => Code::Ok,
            1 => Code::Cancelled,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            6 => Code::AlreadyExists,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            9 => Code::FailedPrecondition,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }
}

/// `google.rpc.Status`: the error carried in a ttrpc response.
#[derive(Clone, PartialEq, Message)]
pub struct Status {
    /// A [`Code`] as its number.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// What went wrong, for a person.
    #[prost(string, tag = "2")]
    pub message: String,
}

impl Status {
    /// A status with a code and message.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status {
            code: code as i32,
            message: message.into(),
        }
    }

    /// The code as a [`Code`].
    pub fn code(&self) -> Code {
        Code::from_i32(self.code)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code(), self.message)
    }
}

impl std::error::Error for Status {}

impl From<std::io::Error> for Status {
    fn from(e: std::io::Error) -> Status {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => Code::NotFound,
            std::io::ErrorKind::AlreadyExists => Code::AlreadyExists,
            std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                Code::InvalidArgument
            }
            _ => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
