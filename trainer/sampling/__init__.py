"""Preview images during training: prompt lines, a denoising loop, and the hook the step loop calls."""
