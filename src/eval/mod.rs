//! Evaluations during training: HellaSwag (the validation loss is the loader's validation
//! split through [`crate::train::trainer::Trainer::mean_loss`]).

pub mod hellaswag;
