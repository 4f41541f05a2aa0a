fn main() { tch::Tensor::from(1.0f32).print(); }
