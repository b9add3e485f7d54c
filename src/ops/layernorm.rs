//! (to be written)

pub(crate) fn shader_variants() -> Vec<super::ShaderVariant> {
    Vec::new()
}
