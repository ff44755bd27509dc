"""The model repository: model folders on disk, their configs, packaging, the default teacher."""
