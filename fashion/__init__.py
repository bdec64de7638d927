"""The apps, thin over the library in `stages.common`:

- `fashion-exp` (presets): the seed's configurations as named DVC experiments;
- `fashion-bundle` (bundle): one zip of a finished run;
- `fashion-generate` (generate): baseline and LoRA side by side for a new photo or sketch;
- `fashion-studio` (studio, with sketch): the same in a local web page.

No stage imports this package, so editing an app reruns nothing.
"""
