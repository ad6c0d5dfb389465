//! The size of a job's VM. A `Shape` is always within the limits: it is made by [`Shape::new`]
//! or by deserializing, which checks the same way, so every VMM can be given what it asks for.

use serde::{Deserialize, Serialize};

/// The most vCPUs a job's VM may have.
pub const MAX_VCPUS: u8 = 64;
/// The most memory a job's VM may have, in GiB.
pub const MAX_MEMORY_GB: u32 = 512;

/// What a job gets when its labels name no shape.
pub const DEFAULT_SHAPE: Shape = Shape {
    vcpus: 2,
    memory_gb: 4,
};
/// What a job gets when its labels name no image.
pub const DEFAULT_IMAGE: &str = "ubuntu-24.04";

/// A job VM's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(try_from = "RawShape")]
pub struct Shape {
    // Literal limits (utoipa takes no constants); the scheduler's OpenAPI test compares them.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    vcpus: u8,
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 512))]
    memory_gb: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a VM shape is 1 to {MAX_VCPUS} vCPUs and 1 to {MAX_MEMORY_GB} GiB, not {vcpus} vCPUs and {memory_gb} GiB")]
pub struct ShapeError {
    pub vcpus: u64,
    pub memory_gb: u64,
}

#[derive(Deserialize)]
struct RawShape {
    vcpus: u64,
    memory_gb: u64,
}

impl TryFrom<RawShape> for Shape {
    type Error = ShapeError;
    fn try_from(raw: RawShape) -> Result<Shape, ShapeError> {
        Shape::new(raw.vcpus, raw.memory_gb)
    }
}

impl Shape {
    pub fn new(vcpus: u64, memory_gb: u64) -> Result<Shape, ShapeError> {
        let err = ShapeError { vcpus, memory_gb };
        let vcpus = u8::try_from(vcpus).map_err(|_| err)?;
        let memory_gb = u32::try_from(memory_gb).map_err(|_| err)?;
        if !(1..=MAX_VCPUS).contains(&vcpus) || !(1..=MAX_MEMORY_GB).contains(&memory_gb) {
            return Err(err);
        }
        Ok(Shape { vcpus, memory_gb })
    }

    pub fn vcpus(self) -> u8 {
        self.vcpus
    }

    pub fn memory_gb(self) -> u32 {
        self.memory_gb
    }

    pub fn memory_mib(self) -> u64 {
        u64::from(self.memory_gb) * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_shapes_within_the_limits_exist() {
        assert_eq!(Shape::new(4, 8).unwrap().memory_mib(), 8192);
        for (v, m) in [(0, 1), (1, 0), (65, 1), (1, 513), (256, 1), (1, 1 << 40)] {
            assert!(Shape::new(v, m).is_err(), "{v} {m}");
        }
        let parsed: Result<Shape, _> = serde_json::from_str(r#"{"vcpus":300,"memory_gb":1}"#);
        assert!(parsed.is_err());
        let shape: Shape = serde_json::from_str(r#"{"vcpus":2,"memory_gb":4}"#).unwrap();
        assert_eq!(shape, DEFAULT_SHAPE);
        assert_eq!(
            serde_json::to_string(&shape).unwrap(),
            r#"{"vcpus":2,"memory_gb":4}"#
        );
    }
}
